"""The `hitq` command with real worker processes: load, kill -9, SIGSTOP past the lease, SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter

import pytest

from hitq.jobqueue import open_queue
from tests.acceptance.conftest import enqueue_fake, hitq, running_job, start_workers, stop, wait_for, write_many
from tests.conftest import SHARED


def exactly_once(db_url, run="r"):
    """Every job done once: one `finished` event each, and claims - releases == attempts (a job
    claimed and given back unstarted, as a stopping stream does, costs no attempt)."""
    q = open_queue(db_url)
    run_id = q.get_run(run).id
    rows = q.result_rows(run)
    events = q.event_log(run_id)
    finished = Counter(e["job_id"] for e in events if e["kind"] == "finished")
    claims = Counter(e["job_id"] for e in events if e["kind"] == "claimed")
    claims.subtract(e["job_id"] for e in events if e["kind"] == "released")
    assert all(r["status"] == "done" for r in rows), Counter(r["status"] for r in rows)
    assert all(finished[r["id"]] == 1 for r in rows)
    assert all(claims[r["id"]] == r["attempts"] for r in rows)
    return rows, events


@pytest.mark.parametrize("stream", ["false", "true"])
def test_eight_workers_drain_3000_jobs_exactly_once(db_url, tmp_path, env, stream):
    data = write_many(tmp_path / "data", 3000)
    enqueue_fake(data, db_url, f"stream={stream}")
    out = hitq("work", "--gpu", "cpu", "--procs", "8", "--drain", "--batch-size", "4", "--poll-seconds", "0.1", "--db", db_url, env=env)
    assert "done 3000/3000" in out.stderr
    assert ("stream of" in out.stderr) == (stream == "true")
    rows, events = exactly_once(db_url)
    assert len(rows) == 3000 and all(r["attempts"] == 1 for r in rows)
    assert not [e for e in events if e["kind"] == "rejected"]
    assert len({e["worker"] for e in events if e["kind"] == "claimed"}) == 8  # every worker took part


def test_streams_of_whole_tables_with_chart_groups_first_run_each_job_once(db_url, tmp_path, env):
    """Table-first groups are whole tables (5.7 questions each) and the claim puts chart tables
    first: every job must reach the engine once (a group once came twice and the worker crashed),
    and no table is split between the two workers (each would prefill it: +13 % of the GPU time
    on two H200s, bench/README.md)."""
    data = tmp_path / "data"
    subprocess.run([str(SHARED / "realhitbench" / "unpack"), str(data), "html"], check=True, capture_output=True)
    hitq("enqueue", "--data", data, "--modality", "text", "--format", "html", "--table-first", "--engine", "fake",
         "--engine-opt", "stream=true", "--run", "r", "--db", db_url)
    out = hitq("work", "--gpu", "cpu", "--procs", "2", "--drain", "--batch-size", "64", "--poll-seconds", "0.1",
               "--db", db_url, env=env, timeout=600)
    assert "stream of" in out.stderr and "worker stopped" not in out.stderr and "left in hand" not in out.stderr
    q = open_queue(db_url)
    rows = q.result_rows("r")
    ran = [r for r in rows if r["error_kind"] != "missing_input"]
    events = q.event_log(q.get_run("r").id)
    finished = Counter(e["job_id"] for e in events if e["kind"] == "finished")
    assert len(ran) > 3000 and all(r["status"] == "done" and finished[r["id"]] == 1 for r in ran)
    key = {r["id"]: r["prefix_key"] for r in rows}
    claimers: dict = {}
    for e in events:
        if e["kind"] == "claimed":
            claimers.setdefault(key[e["job_id"]], set()).add(e["worker"])
    assert len({w for ws in claimers.values() for w in ws}) == 2 and all(len(ws) == 1 for ws in claimers.values())


def test_kill_9_mid_job_is_rerun_after_the_lease(db_url, tmp_path, env):
    data = write_many(tmp_path / "data", 12)
    enqueue_fake(data, db_url, "delay_s=0.4")
    proc = start_workers(db_url, env, lease_s=2)
    q = open_queue(db_url)
    victim, pid = running_job(q)
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "died (exit -9): restarting" in out
    rows, events = exactly_once(db_url)
    by_id = {r["id"]: r for r in rows}
    assert by_id[victim["id"]]["attempts"] == 2
    assert [e["kind"] for e in events if e["job_id"] == victim["id"]][-4:] == ["claimed", "expired", "claimed", "finished"]
    hitq("export", "--run", "r", "--out", tmp_path / "out", "--db", db_url)
    ids = [r["id"] for r in json.loads((tmp_path / "out" / "checkpoint.json").read_text())["results"]]
    assert sorted(ids) == list(range(1, 13))


def test_worker_paused_past_its_lease_cannot_overwrite(db_url, tmp_path, env):
    data = write_many(tmp_path / "data", 6)
    enqueue_fake(data, db_url, "delay_s=1.0")
    proc = start_workers(db_url, env, lease_s=1.5)
    q = open_queue(db_url)
    victim, pid = running_job(q)
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: next((r for r in q.result_rows("r") if r["id"] == victim["id"] and r["fence"] > victim["fence"]), None), timeout=30)
    time.sleep(1.5)
    os.kill(pid, signal.SIGCONT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    rows, events = exactly_once(db_url)
    kinds = [(e["kind"], e["fence"]) for e in events if e["job_id"] == victim["id"]]
    assert ("rejected", victim["fence"]) in kinds  # the late result of the paused worker
    assert {r["id"]: r for r in rows}[victim["id"]]["attempts"] == 2


@pytest.mark.parametrize("stream", ["false", "true"])
def test_sigterm_finishes_or_releases_and_exits_0(db_url, tmp_path, env, stream):
    """Batches, and streams (jobs claimed by a feeder thread while others run): what was started
    finishes, what was claimed and not started goes back; a second drain does the rest once."""
    data = write_many(tmp_path / "data", 40)
    enqueue_fake(data, db_url, "delay_s=0.3", f"stream={stream}")
    proc = start_workers(db_url, env, 2, None, False, "--batch-size", "3")
    q = open_queue(db_url)
    wait_for(lambda: q.stats(q.get_run("r"))["counts"]["done"] >= 4)
    out = stop(proc, signal.SIGTERM)
    assert proc.returncode == 0, out
    counts = q.stats(q.get_run("r"))["counts"]
    assert counts["running"] == 0 and counts["error"] == 0 and counts["pending"] > 0
    hitq("work", "--gpu", "cpu", "--procs", "2", "--drain", "--poll-seconds", "0.1", "--db", db_url, env=env)
    exactly_once(db_url)
