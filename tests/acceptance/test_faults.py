"""Faults one at a time, with real `hitq work` processes and the fake engine: a hung generation
(--job-timeout), a poison job that kills its worker every time (--max-attempts), PostgreSQL
connections terminated or the server restarted mid-run, a SQLite file locked past busy_timeout.
Each ends with every job settled exactly once (docs/faults.md)."""
from __future__ import annotations

import os
import signal
import time

import pytest
import sqlalchemy as sa

from hitq.jobqueue import open_queue
from hitq.jobqueue.database import RetryPolicy, is_transient
from tests.acceptance.conftest import hitq, start, start_workers, wait_for, write_many
from tests.acceptance.faults import (
    assert_exactly_once, hold_sqlite_lock, pg_cluster, restart_postgres, terminate_backends, worker_pids,
)
from tests.conftest import _new_pg_database


@pytest.fixture
def pg_url(pg_admin_url):
    if pg_admin_url is None:
        pytest.skip("PostgreSQL not reachable (set HITQ_TEST_POSTGRES_URL)")
    return _new_pg_database(pg_admin_url)


def enqueue(db_url, data, *opts, run="r"):
    hitq("enqueue", "--data", data, "--modality", "text", "--format", "csv", "--engine", "fake", "--run", run, *opts, "--db", db_url)


# -- the retry policy, in process --------------------------------------------------------------------
def test_retry_policy_waits_out_transient_errors_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
        return "ok"

    assert RetryPolicy(give_up_s=5, first_wait_s=0.01).call(flaky) == "ok" and len(calls) == 3
    with pytest.raises(sa.exc.OperationalError):  # the CLI default: no retry, a clear error at once
        RetryPolicy(give_up_s=0).call(lambda: flaky() if calls.clear() is None else None)
    with pytest.raises(ValueError):
        RetryPolicy(give_up_s=5).call(lambda: (_ for _ in ()).throw(ValueError("a bug, not an outage")))


def test_sqlite_errors_that_are_not_outages_are_not_retried(tmp_path):
    import sqlite3

    locked = sa.exc.OperationalError("UPDATE jobs", {}, sqlite3.OperationalError("database is locked"))
    no_table = sa.exc.OperationalError("SELECT * FROM nope", {}, sqlite3.OperationalError("no such table: nope"))
    assert is_transient(locked) and not is_transient(no_table)


def test_a_finish_retried_after_its_commit_is_not_a_second_result(db_url, tmp_path):
    """The connection drops after COMMIT but before the reply: the retried finish finds the row
    already done under its own fence and reports success, without a second event."""
    data = write_many(tmp_path / "data", 2)
    enqueue(db_url, data)
    q = open_queue(db_url)
    [job] = q.claim("w1", 1, 60)
    assert q.finish(job, "w1", {"prediction": "a"})
    assert q.finish(job, "w1", {"prediction": "a"})  # the retry
    kinds = [e["kind"] for e in q.event_log() if e["job_id"] == job.id]
    assert kinds == ["enqueued", "claimed", "finished"]
    assert not q.fail(job, "w1", "engine_error", "late")  # another outcome for a settled job: rejected
    assert [e["kind"] for e in q.event_log() if e["job_id"] == job.id][-1] == "rejected"
    assert next(r for r in q.result_rows("r") if r["id"] == job.id)["prediction"] == "a"


# -- hung generation, poison job -------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
def test_hung_generation_is_bounded_by_job_timeout(tmp_path, env, batch):
    db_url = f"sqlite:///{tmp_path / 'hitq.db'}"
    enqueue(db_url, write_many(tmp_path / "data", 9), "--engine-opt", "hang=4")
    t0 = time.monotonic()
    out = hitq("work", "--gpu", "cpu", "--procs", "2", "--drain", "--batch-size", batch, "--job-timeout", "3",
               "--lease-seconds", "60", "--poll-seconds", "0.1", "--db", db_url, env=env, timeout=120)
    assert time.monotonic() - t0 < 60  # bounded by the timeout, not by the 60 s lease or the hour-long hang
    assert "ran past --job-timeout 3.0s: recycled worker" in out.stderr
    rows = open_queue(db_url).result_rows("r")
    timed_out = {r["query_id"] for r in rows if r["status"] == "error"}
    assert 4 in timed_out and len(timed_out) <= batch  # a hung batch times out as a whole, nothing more
    assert all(r["error_kind"] == "timeout" and "--job-timeout" in r["error_message"] for r in rows if r["status"] == "error")
    assert_exactly_once(db_url, errors={i: "timeout" for i in timed_out})


def test_poison_job_ends_crashed_after_max_attempts_and_the_rest_finish(db_url, tmp_path, env):
    enqueue(db_url, write_many(tmp_path / "data", 12), "--engine-opt", "crash=5", "--max-attempts", "3")
    out = hitq("work", "--gpu", "cpu", "--procs", "2", "--drain", "--lease-seconds", "1.5", "--poll-seconds", "0.1",
               "--db", db_url, env=env, timeout=120)
    assert out.stderr.count("died (exit 17)") == 3
    rows, events = assert_exactly_once(db_url, errors={5: "crashed"})
    poison = next(r for r in rows if r["query_id"] == 5)
    assert poison["attempts"] == 3 and "3 attempts" in poison["error_message"]
    assert [e["kind"] for e in events if e["job_id"] == poison["id"]][-2:] == ["claimed", "expired"]


# -- the database goes away ------------------------------------------------------------------------
def _drain_under(db_url, tmp_path, env, n, fault, *work_opts, delay="0.01"):
    """Drain `n` jobs with 3 workers while `fault()` runs in a thread; returns the supervisor's log."""
    enqueue(db_url, write_many(tmp_path / "data", n), "--engine-opt", f"delay_s={delay}")
    proc = start("work", "--gpu", "cpu", "--procs", "3", "--drain", "--batch-size", "2", "--lease-seconds", "3",
                 "--poll-seconds", "0.1", *work_opts, "--db", db_url, env=env)
    q = open_queue(db_url)
    wait_for(lambda: q.stats(q.get_run("r"))["counts"]["done"] >= 10, timeout=60)
    fault()
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "worker stopped" not in out and "Traceback" not in out, out
    hitq("export", "--run", "r", "--out", tmp_path / "out", "--db", db_url)
    assert_exactly_once(db_url, export_dir=tmp_path / "out")
    return out


def test_postgres_connections_terminated_mid_run(pg_url, tmp_path, env):
    def fault():
        for _ in range(12):
            terminate_backends(pg_url)
            time.sleep(0.25)

    out = _drain_under(pg_url, tmp_path, env, 300, fault)
    assert "retrying" in out or "failed heartbeats" in out  # the workers did meet the outage


@pytest.mark.slow
def test_postgres_restarted_mid_run(pg_url, tmp_path, env):
    cluster = pg_cluster()
    if cluster is None:
        pytest.skip("cannot restart this PostgreSQL (needs root and pg_ctlcluster; HITQ_TEST_NO_PG_RESTART unset)")
    out = _drain_under(pg_url, tmp_path, env, 300, lambda: restart_postgres(cluster, down_s=3.0))
    assert "retrying" in out


def test_sqlite_locked_past_busy_timeout(tmp_path, env):
    db_url = f"sqlite:///{tmp_path / 'hitq.db'}"
    env = dict(env, HITQ_SQLITE_BUSY_TIMEOUT_MS="300")

    def fault():
        for _ in range(2):
            hold_sqlite_lock(db_url, 2.0).join()
            time.sleep(0.5)

    out = _drain_under(db_url, tmp_path, env, 200, fault)
    assert "database is locked" in out and "retrying" in out


def test_worker_restarted_while_the_database_is_away_waits_for_it(tmp_path, env):
    """A worker restarted (after kill -9) while the SQLite file is locked waits for the database
    instead of stopping on a fatal error."""
    db_url = f"sqlite:///{tmp_path / 'hitq.db'}"
    enqueue(db_url, write_many(tmp_path / "data", 60), "--engine-opt", "delay_s=0.05")
    env = dict(env, HITQ_SQLITE_BUSY_TIMEOUT_MS="200")
    proc = start_workers(db_url, env, lease_s=2)
    q = open_queue(db_url)
    wait_for(lambda: q.stats(q.get_run("r"))["counts"]["done"] >= 5, timeout=60)
    victim = worker_pids(proc.pid)[0]
    lock = hold_sqlite_lock(db_url, 4.0)  # the supervisor restarts the victim after 1 s: still locked
    os.kill(victim, signal.SIGKILL)
    lock.join()
    assert lock.locked
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "died (exit -9): restarting" in out and "a restart cannot fix" not in out and "worker stopped" not in out
    assert "retrying" in out  # it did meet the lock
    assert_exactly_once(db_url)
