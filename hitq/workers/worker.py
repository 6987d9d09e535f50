"""The worker process: load the model once, then claim → execute → finish until told to stop.

Signals: the supervisor sends SIGTERM. The first one stops claiming; the batch in hand finishes
and whatever was claimed but not started is released. A second one releases everything held and
exits at once. SIGINT is ignored here (Ctrl+C reaches the supervisor, which decides).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("hitq.worker")
EXIT_FATAL = 3  # the supervisor does not restart a worker that exits with this code
EXIT_DB = 4  # the database stayed unreachable: the supervisor restarts the worker with backoff


@dataclass(frozen=True)
class WorkerSpec:
    db: str
    device: str  # "cpu" or a CUDA index
    run_name: str | None = None
    drain: bool = False
    lease_s: float = 120.0  # a job's lease; heartbeats extend it every lease_s / 3
    batch_size: int = 1  # jobs claimed at once
    max_jobs: int | None = None  # exit after this many jobs
    poll_s: float = 1.0  # sleep when there is nothing to claim
    slot: int = 0  # index of this process among the supervisor's children


class Heartbeat(threading.Thread):
    """Extends the leases of the jobs in hand; notices when one is taken away.

    While the database is away the beats fail (logged, not fatal). The first beat that succeeds
    again re-validates every lease in hand: jobs whose lease expired and went to another worker
    are dropped from `held` and listed in `lost`; their results would be rejected by the fence."""

    def __init__(self, queue, worker: str, lease_s: float):
        super().__init__(daemon=True, name="hitq-heartbeat")
        self.queue, self.worker, self.lease_s = queue, worker, lease_s
        self.held: dict[int, int] = {}
        self.lost: set[int] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def hold(self, jobs) -> None:
        with self.lock:
            self.held = {j.id: j.fence for j in jobs}
            self.lost = set()

    def beat(self) -> set[int]:
        """One heartbeat; returns the ids lost since the jobs were claimed."""
        with self.lock:
            held = dict(self.held)
        owned = self.queue.heartbeat(self.worker, held, self.lease_s)
        with self.lock:
            gone = {job_id for job_id in set(held) - owned if self.held.get(job_id) == held[job_id]}
            for job_id in gone:
                self.held.pop(job_id, None)
            self.lost |= gone
        for job_id in gone:
            log.warning("lost the lease of job %d: its result will be rejected", job_id, extra={"action": "heartbeat_lost"})
        return gone

    def run(self) -> None:
        failing = 0
        while not self.stopped.wait(self.lease_s / 3 if not failing else min(self.lease_s / 3, 1.0)):
            try:
                gone = self.beat()
            except Exception as e:  # the database is away: keep trying, the fence protects results
                failing += 1
                if failing == 1 or failing % 30 == 0:
                    log.warning("heartbeat failed (%d in a row): %s", failing, str(e).splitlines()[0] if str(e) else type(e).__name__,
                                extra={"action": "heartbeat_error"})
                continue
            if failing:
                log.info("database back after %d failed heartbeats: leases re-validated, %d lost", failing, len(gone),
                         extra={"action": "revalidated", "lost": len(gone)})
            failing = 0
def child_main(spec: WorkerSpec, current) -> None:
    """Entry point of a spawned worker process. `current` is a shared array the supervisor reads:
    [job id, fence, start time] of the batch in hand (zeros when idle)."""
    if spec.device != "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.device
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s [worker {spec.device}/{spec.slot} pid {os.getpid()}] %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from hitq.errors import HitqError
    from hitq.jobqueue.database import is_transient, one_line_pool_errors

    one_line_pool_errors()

    try:
        code = Worker(spec, current).loop()
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if is_transient(e):  # the database stayed away past the retry policy: let the supervisor restart us
            log.error("worker stopped: database unavailable: %s", reason, extra={"action": "db_unavailable"})
            code = EXIT_DB
        elif isinstance(e, HitqError):  # what the user can fix: one line
            log.error("worker stopped: %s", reason, extra={"action": "fatal"})
            code = EXIT_FATAL
        else:  # a bug: its name and the traceback, for the report
            log.error("worker stopped: unexpected %s: %s", type(e).__name__, reason, exc_info=True, extra={"action": "fatal"})
            code = EXIT_FATAL
    sys.stderr.flush()
    os._exit(code)


class Worker:
    def __init__(self, spec: WorkerSpec, current=None):
        from hitq.jobqueue import open_queue
        from hitq.jobqueue.database import WORKER_RETRY

        self.spec, self.current = spec, current
        self.queue = WORKER_RETRY.call(lambda: open_queue(spec.db, migrate=False), what="connect")
        self.queue.retry = WORKER_RETRY
        self.id = f"{socket.gethostname()}:{os.getpid()}:{spec.device}"
        self.stop_requested = False
        self.executors: dict[int, object] = {}
        self.engine, self.engine_key = None, None  # the loaded model and what it was loaded for
        self.in_hand: list = []
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, *_):
        if self.stop_requested:  # second signal: give everything back and leave now
            try:
                self.queue.release(self.in_hand, self.id)
            except Exception:  # the database is away: the leases expire and the jobs are retried
                pass
            os._exit(0)
        self.stop_requested = True
        log.info("stopping after the current batch", extra={"action": "stop_requested"})

    def _run_ids(self) -> list[int] | None:
        if self.spec.run_name:
            return [self.queue.get_run(self.spec.run_name).id]
        return None

    def loop(self) -> int:
        self.queue.register_worker(self.id, socket.gethostname(), os.getpid(), self.spec.device)
        heartbeat = Heartbeat(self.queue, self.id, self.spec.lease_s)
        heartbeat.start()
        run_ids, done = self._run_ids(), 0
        try:
            while not self.stop_requested and (self.spec.max_jobs is None or done < self.spec.max_jobs):
                targets = run_ids or self.queue.runs_with_pending()[:1]
                # the model loads before the claim: no leases held while it loads
                ahead = self._executor(targets[0]) if targets and self.queue.unfinished(targets) else None
                jobs = self.queue.claim(self.id, self.spec.batch_size, self.spec.lease_s, targets,
                                        group_rest=self._group_rest(ahead)) if targets else []
                if not jobs:
                    if self.spec.drain and self.queue.unfinished(run_ids) == 0:
                        log.info("no work left: exiting", extra={"action": "drained"})
                        break
                    time.sleep(self.spec.poll_s)
                    continue
                hold = self._holder(heartbeat)
                hold(jobs)
                executor = self._executor(jobs[0].run_id)
                if self._streams(executor):
                    claimed = [len(jobs)]
                    outcome = executor.run_stream(jobs, self._claimer(jobs[0].run_id, done, claimed, self._group_rest(executor)), hold,
                                                  lambda: self.stop_requested, self.spec.batch_size)
                    log.info("stream of %d: %s", claimed[0], outcome, extra={"action": "batch_done"})
                    done += claimed[0]
                else:
                    outcome = executor.run_batch(jobs)
                    log.info("batch of %d: %s", len(jobs), outcome, extra={"action": "batch_done"})
                    done += len(jobs)
                hold([])
        finally:
            heartbeat.stopped.set()
            self.queue.release(self.in_hand, self.id)
            self.queue.set_worker_state(self.id, "stopped")
        return 0

    def _holder(self, heartbeat: Heartbeat):
        """hold(jobs): these are the jobs in hand now (leases extended, released on a second
        SIGTERM, shown to the supervisor)."""
        def hold(jobs) -> None:
            self.in_hand = list(jobs)
            heartbeat.hold(jobs)
            self._mark(jobs)
        return hold

    def _streams(self, executor) -> bool:
        """Whether this worker runs the executor's jobs as a stream (else in batches)."""
        return executor is not None and executor.streams() and self.spec.batch_size > 1

    def _group_rest(self, executor) -> int:
        """A stream's claim finishes the prefix group it ends in (a batch more at most), so the
        group's prefix is prefilled once; batches and --max-jobs take exact counts."""
        return self.spec.batch_size if self._streams(executor) and self.spec.max_jobs is None else 0

    def _claimer(self, run_id: int, done: int, claimed: list[int], group_rest: int):
        """claim(n) for a stream: up to n more jobs of `run_id`, none once stopping or at
        max_jobs; claimed[0] counts them (the first lot included)."""
        def claim(n: int) -> list:
            if self.spec.max_jobs is not None:
                n = min(n, self.spec.max_jobs - done - claimed[0])
            if self.stop_requested or n <= 0:
                return []
            jobs = self.queue.claim(self.id, n, self.spec.lease_s, [run_id], group_rest=group_rest)
            claimed[0] += len(jobs)
            return jobs
        return claim

    def _mark(self, jobs) -> None:
        """Tell the supervisor what is in hand: [start time, n, id1, fence1, id2, fence2, …]."""
        if self.current is not None:
            jobs = jobs[: (len(self.current) - 2) // 2]
            self.current[0] = 0.0  # idle while the ids are rewritten: the supervisor skips this slot
            for i, job in enumerate(jobs):
                self.current[2 + 2 * i], self.current[3 + 2 * i] = job.id, job.fence
            self.current[1] = len(jobs)
            self.current[0] = time.time() if jobs else 0.0

    def _executor(self, run_id: int):
        """The Executor of `run_id`. One model is in memory at a time; it is kept when the next
        run uses the same engine, model directory and engine options (no 8B reload per run)."""
        if run_id not in self.executors:
            from hitq.engine import load_engine
            from hitq.workers.execute import Executor

            run = next(r for r in self.queue.list_runs() if r.id == run_id)
            config = run.config
            options = dict(config.get("extra", {}).get("engine_opts", {}))
            key = (config.get("engine", "transformers"), config.get("model_dir"), tuple(sorted(options.items())))
            if self.engine_key != key:
                self.executors, self.engine = {}, None  # free the old model before loading the next
                device = "cpu" if self.spec.device == "cpu" else "cuda"
                self.engine, self.engine_key = load_engine(key[0], key[1], device=device, **options), key
            self.executors = {run_id: Executor(self.queue, self.id, run, self.engine)}
        return self.executors[run_id]
