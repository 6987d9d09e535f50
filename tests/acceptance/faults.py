"""Fault injection for acceptance tests: find, kill, pause and resume worker processes, drop
database connections (PostgreSQL `pg_terminate_backend`, a SQLite write lock held past the busy
timeout, a PostgreSQL restart), and check exactly-once from the event log and the export.

The engine side of fault injection is `hitq.engine.fake` (`--engine-opt hang=3` or
`HITQ_FAKE_FAULTS="crash=5;oom=7"`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from hitq.jobqueue import open_queue


# -- processes -------------------------------------------------------------------------------------
def worker_pids(supervisor_pid: int) -> list[int]:
    """The worker processes of a `hitq work` supervisor (spawned children, not the resource tracker)."""
    pids = []
    try:
        children = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text().split()
    except OSError:
        return []
    for pid in map(int, children):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            pass
    return pids


def signal_pid(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


# -- the database connection -----------------------------------------------------------------------
def _admin_engine(db_url: str) -> sa.Engine:
    url = make_url(db_url.replace("postgresql://", "postgresql+psycopg://", 1)).set(database="postgres")
    return sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


def terminate_backends(db_url: str) -> int:
    """pg_terminate_backend every connection to `db_url`'s database (from the `postgres` database)."""
    name = make_url(db_url).database
    engine = _admin_engine(db_url)
    try:
        with engine.connect() as conn:
            return len(conn.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name AND pid <> pg_backend_pid()"
            ), {"name": name}).all())
    finally:
        engine.dispose()


def sqlite_path(db_url: str) -> str:
    return make_url(db_url).database


def hold_sqlite_lock(db_url: str, seconds: float) -> threading.Thread:
    """Hold `BEGIN EXCLUSIVE` on the SQLite file for `seconds` (in a thread; returns it started,
    with `.locked` telling whether it got the lock: under chaos the workers can keep it busy
    past the 30 s wait, and then there is simply no outage this time)."""
    ready = threading.Event()

    def hold():
        conn = sqlite3.connect(sqlite_path(db_url), isolation_level=None, timeout=30)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            thread.locked = True
            ready.set()
            time.sleep(seconds)
            conn.execute("COMMIT")
        except sqlite3.OperationalError:  # "database is locked": never got it
            pass
        finally:
            ready.set()
            conn.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.locked = False
    thread.start()
    ready.wait(35)
    return thread


def drop_connections(db_url: str, sqlite_lock_s: float = 1.0) -> None:
    """The database goes away for a moment: PostgreSQL connections are terminated; a SQLite file is
    locked past the busy timeout (there is no connection to drop)."""
    if db_url.startswith("sqlite"):
        hold_sqlite_lock(db_url, sqlite_lock_s)
    else:
        terminate_backends(db_url)


def pg_cluster() -> list[str] | None:
    """`pg_ctlcluster VERSION main` when this machine runs its PostgreSQL that way and we may restart it."""
    if os.environ.get("HITQ_TEST_NO_PG_RESTART") or os.geteuid() != 0 or not shutil.which("pg_ctlcluster"):
        return None
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main"] if versions else None


def restart_postgres(cluster: list[str], down_s: float = 2.0) -> None:
    """Stop the server (fast: connections are cut), stay down `down_s`, start it, wait until ready."""
    subprocess.run([*cluster, "stop", "-m", "fast"], check=True, capture_output=True, timeout=60)
    time.sleep(down_s)
    subprocess.run([*cluster, "start"], check=True, capture_output=True, timeout=60)
    for _ in range(120):
        if subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"]).returncode == 0:
            return
        time.sleep(0.25)
    raise AssertionError("PostgreSQL did not come back")


# -- proofs ----------------------------------------------------------------------------------------
def assert_exactly_once(db_url: str, run: str = "r", export_dir: Path | None = None, errors: dict[int, str] | None = None):
    """Every job settled exactly once: one `finished` (or `failed`) event per job, claims == attempts,
    no job left pending/running, and (with `export_dir`) checkpoint.json agrees with the event log.
    `errors` maps the query ids expected to end as error to their kind. Returns (rows, events)."""
    errors = errors or {}
    q = open_queue(db_url)
    run_id = q.get_run(run).id
    rows = q.result_rows(run)
    events = q.event_log(run_id)
    settled = Counter(e["job_id"] for e in events if e["kind"] in ("finished", "failed"))
    finished = Counter(e["job_id"] for e in events if e["kind"] == "finished")
    claims = Counter(e["job_id"] for e in events if e["kind"] == "claimed")
    status = Counter(r["status"] for r in rows)
    assert status == Counter({"done": len(rows) - len(errors), "error": len(errors)} if errors else {"done": len(rows)}), status
    for r in rows:
        if r["query_id"] in errors:
            assert r["status"] == "error" and r["error_kind"] == errors[r["query_id"]], r
        else:
            assert finished[r["id"]] == 1, (r["query_id"], [e for e in events if e["job_id"] == r["id"]])
        assert settled[r["id"]] <= 1, (r["query_id"], [e for e in events if e["job_id"] == r["id"]])
        assert claims[r["id"]] == r["attempts"], (r["query_id"], r["attempts"], claims[r["id"]])
    # The event that settled a job carries the fence of the row's final claim.
    last = {e["job_id"]: e for e in events if e["kind"] in ("finished", "failed")}
    for r in rows:
        if r["id"] in last:
            assert last[r["id"]]["fence"] == r["fence"], r["query_id"]
    if export_dir is not None:
        ckpt = json.loads((Path(export_dir) / "checkpoint.json").read_text())
        done_ids = sorted(r["query_id"] for r in rows if r["id"] in finished)
        assert sorted(ckpt["processed_ids"]) == done_ids
        assert len(ckpt["results"]) == len(rows) and len({r["id"] for r in ckpt["results"]}) == len(rows)
        by_id = {r["query_id"]: r for r in rows}
        for row in ckpt["results"]:
            if row["id"] not in errors:
                assert row["Prediction"] == by_id[row["id"]]["prediction"], row
    return rows, events
