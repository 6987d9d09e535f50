"""The supervisor: one spawned worker process per device slot, restarted with backoff when it
dies, recycled when a job outlives --job-timeout, and stopped gracefully on SIGINT/SIGTERM."""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import signal
import time
from dataclasses import dataclass, field

from hitq.workers.worker import EXIT_FATAL, WorkerSpec, child_main

log = logging.getLogger("hitq.supervisor")
BACKOFF_S = (1, 2, 5, 10, 30)  # waits before restarting a child that died, by consecutive deaths
HEALTHY_S = 60.0  # a child that lived this long before dying starts the backoff over


@dataclass
class Slot:
    spec: WorkerSpec
    process: mp.Process | None = None
    current: object = None  # shared [start time, n, id1, fence1, …] of the batch in hand (worker._mark)
    started_at: float = 0.0
    deaths: int = 0
    restart_at: float = 0.0
    finished: bool = False
    history: list = field(default_factory=list)


class Supervisor:
    def __init__(self, specs: list[WorkerSpec], job_timeout_s: float | None = None, grace_s: float = 600.0,
                 progress=None, progress_every_s: float = 10.0):
        self.ctx = mp.get_context("spawn")
        self.slots = [Slot(spec) for spec in specs]
        self.job_timeout_s, self.grace_s = job_timeout_s, grace_s
        self.progress, self.progress_every_s = progress, progress_every_s
        self.stopping = 0  # number of stop signals received
        self.fatal = False

    def _start(self, slot: Slot) -> None:
        # room for twice the batch: a stream holds up to its backlog (the batch) + a lot + the rest of a prefix group
        slot.current = self.ctx.Array("d", 2 + 4 * max(1, slot.spec.batch_size), lock=False)
        slot.started_at = time.time()
        slot.process = self.ctx.Process(target=child_main, args=(slot.spec, slot.current), daemon=False)
        slot.process.start()
        log.info("started worker %s/%d (pid %d)", slot.spec.device, slot.spec.slot, slot.process.pid, extra={"action": "start_worker"})

    def _on_signal(self, signum, _frame) -> None:
        self.stopping += 1
        log.info("%s: asking workers to finish their batch and stop%s", signal.Signals(signum).name,
                 " (again: release and exit now)" if self.stopping > 1 else "", extra={"action": "stop"})
        for slot in self.slots:
            if slot.process is not None and slot.process.is_alive():
                slot.process.terminate()  # SIGTERM; the worker finishes or releases what it holds

    def run(self) -> int:
        """Supervise until every worker has finished (drain, --max-jobs) or a stop signal."""
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        for slot in self.slots:
            self._start(slot)
        last_progress = time.monotonic()
        while True:
            now = time.time()
            for slot in self.slots:
                self._check(slot, now)
            if all(s.finished for s in self.slots):
                break
            if self.stopping and all(s.process is None or not s.process.is_alive() for s in self.slots):
                break
            if self.progress and time.monotonic() - last_progress > self.progress_every_s:
                self._progress()
                last_progress = time.monotonic()
            time.sleep(0.2)
        if self.progress:
            self._progress()
        return 1 if self.fatal else 0

    def _progress(self) -> None:
        try:
            self.progress()
        except Exception as e:  # the database is away: the workers wait for it, so do we
            log.warning("no progress report: %s", str(e).splitlines()[0] if str(e) else type(e).__name__,
                        extra={"action": "progress_error"})

    def _check(self, slot: Slot, now: float) -> None:
        p = slot.process
        if p is None:
            if not slot.finished and not self.stopping and now >= slot.restart_at:
                self._start(slot)
            return
        if p.is_alive():
            started = slot.current[0]
            if self.job_timeout_s and started and now - started > self.job_timeout_s:
                p.kill()  # first, so that the batch read below cannot change under us
                p.join()
                n = int(slot.current[1])
                held = [(int(slot.current[2 + 2 * i]), int(slot.current[3 + 2 * i])) for i in range(n)]
                log.warning("job(s) %s ran past --job-timeout %ss: recycled worker pid %d", ",".join(str(j) for j, _ in held),
                            self.job_timeout_s, p.pid, extra={"action": "job_timeout"})
                slot.history.append(("timeout", [j for j, _ in held]))
                self._timed_out(slot, held)
                slot.process = None
                slot.restart_at = now
            return
        p.join()
        code = p.exitcode
        slot.process = None
        slot.history.append(("exit", code))
        if code == 0 or self.stopping:
            slot.finished = True
        elif code == EXIT_FATAL:
            log.error("worker %s/%d stopped on an error that a restart cannot fix", slot.spec.device, slot.spec.slot,
                      extra={"action": "fatal"})
            slot.finished, self.fatal = True, True
        else:
            if now - slot.started_at > HEALTHY_S:
                slot.deaths = 0
            wait = BACKOFF_S[min(slot.deaths, len(BACKOFF_S) - 1)]
            slot.deaths += 1
            slot.restart_at = now + wait
            log.warning("worker %s/%d died (exit %s): restarting in %ss", slot.spec.device, slot.spec.slot, code, wait,
                        extra={"action": "restart_worker"})

    def _timed_out(self, slot: Slot, held: list[tuple[int, int]]) -> None:
        """Record `timeout` on the jobs the killed worker held, fenced like any result. A batch that
        hangs times out as a whole: which of its jobs hung is unknown (`--batch-size 1` tells)."""
        from hitq.jobqueue import open_queue
        from hitq.jobqueue.database import WORKER_RETRY
        from hitq.jobqueue.store import Job

        what = f"a batch of {len(held)}" if len(held) > 1 else "the generation"
        try:
            queue = WORKER_RETRY.call(lambda: open_queue(slot.spec.db, migrate=False), what="connect")
            queue.retry = WORKER_RETRY
            for job_id, fence in held:
                queue.fail(Job(job_id, 0, 0, "", "", "", "", "", "", 0, fence), f"supervisor:{slot.spec.device}/{slot.spec.slot}",
                           "timeout", f"{what} ran past --job-timeout {self.job_timeout_s}s; the worker was recycled")
        except Exception as e:  # the lease expires and the job is retried: nothing is lost
            log.error("could not record the timeout: %s", str(e).splitlines()[0] if str(e) else type(e).__name__,
                      extra={"action": "timeout_not_recorded"})


def specs_for(devices: list[str], procs: int, base: WorkerSpec) -> list[WorkerSpec]:
    """One spec per (device, process) slot."""
    return [dataclasses.replace(base, device=d, slot=i) for d in devices for i in range(procs)]
