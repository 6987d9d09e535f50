"""Load benchmark of the queue alone: N worker processes claim and finish M no-op jobs.

Each process loops `Queue.claim` → `Queue.finish` (no engine: the job's work is nothing) and times
every call; the numbers are the queue's own ceiling. At the end the event log must show every job
finished exactly once (one `finished` event per job, claims == attempts, all rows done).

    python bench/queue_load.py --db sqlite:///tmp/bench.db --procs 16 --jobs 20000 --out bench/queue-load-sqlite.json
    python bench/queue_load.py --db postgresql://postgres@127.0.0.1:5432/postgres --procs 16 --jobs 20000 \\
        --out bench/queue-load-postgres.json

With a PostgreSQL URL a fresh database `hitq_bench_<random>` is created next to the given one and
dropped afterwards (--keep to keep it); a SQLite file is deleted first.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _worker(url: str, run_id: int, batch: int, start_at, out_path: str) -> None:
    from hitq.jobqueue import open_queue
    from hitq.jobqueue.database import WORKER_RETRY

    q = open_queue(url, migrate=False)
    q.retry = WORKER_RETRY
    name = f"{socket.gethostname()}:{os.getpid()}:bench"
    claim_s, finish_s, empty = [], [], 0
    start_at.wait()
    while True:
        t = time.perf_counter()
        jobs = q.claim(name, batch, 300.0, [run_id])
        claim_s.append(time.perf_counter() - t)
        if not jobs:
            claim_s.pop()  # an empty claim is polling, not a claim
            if q.unfinished([run_id]) == 0:
                break
            empty += 1
            time.sleep(0.01)
            continue
        for job in jobs:
            t = time.perf_counter()
            assert q.finish(job, name, {"prediction": str(job.query_id), "processing_time": 0.0})
            finish_s.append(time.perf_counter() - t)
    Path(out_path).write_text(json.dumps({"claim_s": claim_s, "finish_s": finish_s, "empty": empty, "end": time.time()}))


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def _fresh_postgres(url: str) -> tuple[str, str]:
    import sqlalchemy as sa

    from hitq.jobqueue.database import normalize_url

    name = f"hitq_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(normalize_url(url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return url.rsplit("/", 1)[0] + "/" + name, name


def _drop_postgres(url: str, name: str) -> None:
    import sqlalchemy as sa

    from hitq.jobqueue.database import normalize_url

    admin = sa.create_engine(normalize_url(url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True, help="sqlite:///FILE or postgresql://… (a fresh database is created beside it)")
    parser.add_argument("--procs", type=int, default=16, help="worker processes")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1, help="jobs per claim")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the PostgreSQL database")
    args = parser.parse_args(argv)

    from hitq.jobqueue import database, open_queue, mask

    created = None
    url = args.db
    if url.startswith(("postgresql", "postgres:")):
        url, created = _fresh_postgres(args.db)
    else:
        path = Path(database.normalize_url(url).split("///", 1)[1])
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
    try:
        q = open_queue(url)
        rows = [{"query_id": i, "file_name": f"table{i % 50}", "question_type": "Fact Checking", "sub_q_type": "Value-Matching",
                 "question": f"Question {i}?", "reference": str(i), "prefix_key": f"{i % 50:016d}", "status": "pending"}
                for i in range(1, args.jobs + 1)]
        t = time.perf_counter()
        q.enqueue("bench", {"bench": True}, "bench", rows)
        enqueue_s = time.perf_counter() - t
        run_id = q.get_run("bench").id
        ctx = mp.get_context("spawn")
        start_at = ctx.Event()
        tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"hitq-bench-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        procs = [ctx.Process(target=_worker, args=(url, run_id, args.batch, start_at, str(tmp / f"{i}.json"))) for i in range(args.procs)]
        for p in procs:
            p.start()
        time.sleep(3.0)  # let every process import and connect before the clock starts
        began = time.time()
        start_at.set()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise SystemExit(f"a worker failed: exit codes {[p.exitcode for p in procs]}")
        parts = [json.loads((tmp / f"{i}.json").read_text()) for i in range(args.procs)]
        wall = max(part["end"] for part in parts) - began
        claim_s = [x for part in parts for x in part["claim_s"]]
        finish_s = [x for part in parts for x in part["finish_s"]]

        # Exactly once, from the event log.
        events = q.event_log(run_id)
        finished = Counter(e["job_id"] for e in events if e["kind"] == "finished")
        claimed = Counter(e["job_id"] for e in events if e["kind"] == "claimed")
        result_rows = q.result_rows("bench")
        exactly_once = (
            len(result_rows) == args.jobs and all(r["status"] == "done" for r in result_rows)
            and all(finished[r["id"]] == 1 for r in result_rows) and all(claimed[r["id"]] == r["attempts"] for r in result_rows)
        )
        kinds = Counter(e["kind"] for e in events)
        with q.engine.connect() as conn:
            server = conn.exec_driver_sql("SELECT version()" if q.is_postgres else "SELECT 'SQLite ' || sqlite_version()").scalar()
        result = {
            "database": "postgresql" if q.is_postgres else "sqlite", "server": server, "url": mask(database.normalize_url(url)),
            "procs": args.procs, "jobs": args.jobs, "batch": args.batch, "enqueue_s": round(enqueue_s, 2),
            "wall_s": round(wall, 2), "claims": len(claim_s), "claims_per_s": round(len(claim_s) / wall, 1),
            "finishes": len(finish_s), "finishes_per_s": round(len(finish_s) / wall, 1),
            "jobs_per_s": round(args.jobs / wall, 1), "empty_claims": sum(part["empty"] for part in parts),
            "claim_latency_ms": {k: round(v * 1000, 2) for k, v in (("p50", _pct(claim_s, 50)), ("p90", _pct(claim_s, 90)),
                                                                     ("p99", _pct(claim_s, 99)), ("max", max(claim_s)),
                                                                     ("mean", statistics.fmean(claim_s)))},
            "finish_latency_ms": {k: round(v * 1000, 2) for k, v in (("p50", _pct(finish_s, 50)), ("p99", _pct(finish_s, 99)),
                                                                      ("max", max(finish_s)))},
            "events": dict(kinds), "exactly_once": exactly_once,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "processor": platform.processor() or platform.machine()},
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + [mask(a) if "://" in a else a for a in sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
        return 0 if exactly_once else 1
    finally:
        if created and not args.keep:
            _drop_postgres(args.db, created)


if __name__ == "__main__":
    sys.exit(main())
