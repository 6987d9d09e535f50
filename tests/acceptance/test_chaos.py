"""The promise under chaos: a 500-job drain while a chaos thread kills workers with SIGKILL,
pauses and resumes them (SIGSTOP/SIGCONT, sometimes past their lease) and drops the database
connections (PostgreSQL: pg_terminate_backend; SQLite: the file locked past busy_timeout), at
random. At the end every job is done exactly once, and the event log and the export agree.

The seed is printed; rerun one case with HITQ_CHAOS_SEED=N.
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter

import pytest

from hitq.jobqueue import open_queue
from hitq.jobqueue.database import RetryPolicy
from tests.acceptance.conftest import hitq, start, write_many
from tests.acceptance.faults import assert_exactly_once, drop_connections, signal_pid, worker_pids

JOBS = 500
CHAOS_S = 30.0  # chaos stops after this long, or when 95% of the jobs are done
PATIENT = RetryPolicy(give_up_s=30)  # the test's own reads wait out the outages it causes


class Chaos(threading.Thread):
    """Every 0.2–0.6 s one of: kill -9 a worker, pause one for 0.3–3 s, drop the database connections."""

    def __init__(self, supervisor_pid: int, db_url: str, seed: int, done):
        super().__init__(daemon=True, name="chaos")
        self.pid, self.db_url, self.rng, self.done = supervisor_pid, db_url, random.Random(seed), done
        self.stop = threading.Event()
        self.paused: dict[int, float] = {}  # pid -> when to resume
        self.actions: Counter = Counter()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            for pid in list(self.paused):
                signal_pid(pid, signal.SIGCONT)

    def _run(self) -> None:
        start = time.monotonic()
        while not self.stop.wait(self.rng.uniform(0.2, 0.6)):
            now = time.monotonic()
            for pid, until in list(self.paused.items()):
                if now >= until:
                    signal_pid(pid, signal.SIGCONT)
                    del self.paused[pid]
                    self.actions["resume"] += 1
            if now - start > CHAOS_S or self.done():
                return
            pids = [p for p in worker_pids(self.pid) if p not in self.paused]
            action = self.rng.choice(["kill", "pause", "pause", "drop", "drop"])
            if action == "kill" and pids:
                if signal_pid(self.rng.choice(pids), signal.SIGKILL):
                    self.actions["kill"] += 1
            elif action == "pause" and len(pids) > 1:  # keep one worker running
                victim = self.rng.choice(pids)
                if signal_pid(victim, signal.SIGSTOP):
                    self.paused[victim] = now + self.rng.uniform(0.3, 3.0)
                    self.actions["pause"] += 1
            elif action == "drop":
                drop_connections(self.db_url, sqlite_lock_s=self.rng.uniform(0.6, 1.5))
                self.actions["drop"] += 1


@pytest.mark.slow
def test_500_jobs_exactly_once_under_chaos(db_url, tmp_path, env):
    seed = int(os.environ.get("HITQ_CHAOS_SEED", random.randrange(1 << 30)))
    print(f"chaos seed {seed} (rerun with HITQ_CHAOS_SEED={seed})")
    data = write_many(tmp_path / "data", JOBS)
    hitq("enqueue", "--data", data, "--modality", "text", "--format", "csv", "--engine", "fake", "--engine-opt", "delay_s=0.05",
         "--max-attempts", "100", "--run", "r", "--db", db_url)
    env = dict(env, HITQ_SQLITE_BUSY_TIMEOUT_MS="500")
    t0 = time.monotonic()
    proc = start("work", "--gpu", "cpu", "--procs", "4", "--drain", "--batch-size", "2", "--lease-seconds", "2",
                 "--poll-seconds", "0.1", "--db", db_url, env=env)
    q = open_queue(db_url)
    run = q.get_run("r")

    def mostly_done() -> bool:
        counts = PATIENT.call(lambda: q.stats(run))["counts"]
        return counts["done"] + counts["error"] >= 0.95 * JOBS

    chaos = Chaos(proc.pid, db_url, seed, mostly_done)
    chaos.start()
    try:
        out, _ = proc.communicate(timeout=150)
    finally:
        chaos.stop.set()
        chaos.join(10)
        if proc.poll() is None:
            proc.kill()
    elapsed = time.monotonic() - t0
    print(f"chaos actions {dict(chaos.actions)}, drained in {elapsed:.1f}s")
    assert chaos.error is None, chaos.error
    assert proc.returncode == 0, out[-5000:]
    assert chaos.actions["kill"] and chaos.actions["pause"] and chaos.actions["drop"], chaos.actions
    hitq("export", "--run", "r", "--out", tmp_path / "out", "--db", db_url)
    rows, events = assert_exactly_once(db_url, export_dir=tmp_path / "out")
    assert len(rows) == JOBS
    kinds = Counter(e["kind"] for e in events)
    print(f"events {dict(kinds)}")
    assert kinds["claimed"] > JOBS  # the chaos did cost retries…
    assert kinds["finished"] == JOBS  # …and nothing ran to a result twice
