"""`hitq work`: run workers until the queue is drained or Ctrl+C."""
from __future__ import annotations

import logging
import sys

import click

from hitq.cli.options import db_option, parse_devices, run_option

GPU_BATCH = 64  # a claim on a GPU: enough rows to share prefixes and keep the decode batch full


@click.command()
@click.option("--gpu", "gpu", default="0", show_default=True, help="Devices: 0..3, 0,2 or cpu.")
@run_option
@click.option("--drain", is_flag=True, help="Exit 0 once no pending or running job is left.")
@click.option("--lease-seconds", default=120.0, show_default=True, help="Lease of a claimed job; heartbeats extend it.")
@click.option("--max-jobs", type=int, help="Each worker exits after this many jobs.")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Jobs claimed and generated together [default: 64 on GPUs, where shared prefixes and batched "
                   "decoding need company; 1 on cpu].")
@click.option("--procs", default=1, show_default=True, help="Worker processes per device.")
@click.option("--job-timeout", type=float, help="Recycle a worker whose job runs longer (seconds); the job ends as timeout.")
@click.option("--poll-seconds", default=1.0, show_default=True, help="Wait between claims when the queue is empty.")
@db_option
def work(gpu, run_name, drain, lease_seconds, max_jobs, batch_size, procs, job_timeout, poll_seconds, db):
    """Start one worker process per device; Ctrl+C finishes or releases what they hold.

    \b
    Example:
      hitq work --gpu 0..3
      hitq work --gpu cpu --run text_html --drain
    """
    from hitq.jobqueue import open_queue
    from hitq.jobqueue.database import WORKER_RETRY, RetryPolicy, one_line_pool_errors
    from hitq.workers.supervisor import Supervisor, specs_for
    from hitq.workers.worker import WorkerSpec

    devices = parse_devices(gpu)
    batch_size = batch_size or (1 if devices == ["cpu"] else GPU_BATCH)
    # Migrates a new database once, before any child starts. A lock or a restart is waited out for
    # 30 s (a wrong URL still fails in one line); once running, the supervisor waits like workers.
    queue = RetryPolicy(give_up_s=30.0, first_wait_s=0.1, max_wait_s=2.0).call(lambda: open_queue(db), what="connect")
    queue.retry = WORKER_RETRY
    if run_name:
        queue.get_run(run_name)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s [supervisor] %(message)s")
    one_line_pool_errors()
    base = WorkerSpec(db=db, device="cpu", run_name=run_name, drain=drain, lease_s=lease_seconds, batch_size=batch_size,
                      max_jobs=max_jobs, poll_s=poll_seconds)

    def progress():
        for run in [queue.get_run(run_name)] if run_name else queue.list_runs():
            s = queue.stats(run)
            c = s["counts"]
            eta = f"{s['eta_s']}s" if s["eta_s"] is not None else "?"
            click.echo(f"[progress] {run.name}: done {c['done']}/{s['total']}, error {c['error']}, running {c['running']}, "
                       f"pending {c['pending']}, {s['jobs_per_s']:.2f} jobs/s, ETA {eta}", err=True)

    code = Supervisor(specs_for(devices, procs, base), job_timeout_s=job_timeout, progress=progress).run()
    if code:
        raise click.ClickException("a worker stopped on an error that a restart cannot fix (see the log above)")
