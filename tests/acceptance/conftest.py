"""Helpers for running the real `hitq` command in subprocesses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hitq.benchmark.sample import write_sample

HITQ = [sys.executable, "-m", "hitq.cli.main"]


def hitq(*args, env=None, check=True, timeout=300) -> subprocess.CompletedProcess:
    out = subprocess.run([*HITQ, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"hitq {' '.join(map(str, args))} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


def start(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([*HITQ, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def wait_for(predicate, timeout=60.0, every=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not reached in time")


def write_many(data: Path, n: int) -> Path:
    """The sample tables with `n` Fact Checking questions spread over them."""
    write_sample(data, images=False)
    tables = ["demo-table01", "demo-table02", "demo-table03"]
    rows = [{"id": i, "FileName": tables[i % 3], "CompStrucCata": "x", "Source": "x", "Question": f"Question {i}?",
             "QuestionType": "Fact Checking", "SubQType": "Value-Matching", "COT": [], "FinalAnswer": str(i),
             "ProcessedAnswer": str(i)} for i in range(1, n + 1)]
    (data / "QA_final.json").write_text(json.dumps({"queries": rows}))
    return data


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e["PYTHONUNBUFFERED"] = "1"
    return e


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout=60) -> str:
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=timeout)
    return out


def running_job(queue, run="r") -> tuple[dict, int]:
    """Wait until a job of `run` is running; return its row and the pid of the worker holding it."""
    row = wait_for(lambda: next((r for r in queue.result_rows(run) if r["status"] == "running" and r["lease_owner"]), None))
    return row, int(row["lease_owner"].split(":")[1])


def enqueue_fake(data, db_url, *engine_opts, run="r"):
    """Enqueue the text/csv queries of `data` as run `run` on the fake engine."""
    opts = [x for opt in engine_opts for x in ("--engine-opt", opt)]
    hitq("enqueue", "--data", data, "--modality", "text", "--format", "csv", "--engine", "fake", *opts, "--run", run, "--db", db_url)


def start_workers(db_url, env, procs=2, lease_s=None, drain=True, *extra) -> subprocess.Popen:
    """`hitq work --gpu cpu` with `procs` worker processes, polling fast, in the background."""
    args = ["work", "--gpu", "cpu", "--procs", str(procs), "--poll-seconds", "0.1", "--db", db_url, *extra]
    args += ["--drain"] if drain else []
    args += ["--lease-seconds", str(lease_s)] if lease_s else []
    return start(*args, env=env)
