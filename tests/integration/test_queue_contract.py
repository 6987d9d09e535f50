"""The claim protocol, one suite run on SQLite and PostgreSQL (design.md §4)."""
from __future__ import annotations

import threading
import time

import pytest

from hitq.errors import NotFound, RunConfigConflict
from hitq.jobqueue import open_queue


def rows(n, groups=None):
    return [
        {"query_id": i, "file_name": f"t{i % 7}", "question_type": "Fact Checking", "sub_q_type": "", "question": f"q{i}",
         "reference": "r", "prefix_key": f"k{(i % groups) if groups else i:04d}", "status": "pending"}
        for i in range(1, n + 1)
    ]


@pytest.fixture
def queue(db_url):
    return open_queue(db_url)


def test_enqueue_is_idempotent_and_refuses_other_settings(queue):
    assert queue.enqueue("r", {"modality": "text"}, "h1", rows(10)) == (10, 0)
    assert queue.enqueue("r", {"modality": "text"}, "h1", rows(12)) == (2, 10)
    with pytest.raises(RunConfigConflict, match="modality: 'text' -> 'mix'"):
        queue.enqueue("r", {"modality": "mix"}, "h2", rows(12))
    with pytest.raises(NotFound):
        queue.get_run("nope")


def test_claim_orders_by_prefix_group_and_bumps_fence(queue):
    queue.enqueue("r", {}, "h", rows(12, groups=3))
    run = queue.get_run("r")
    jobs = queue.claim("w1", 4, 60, [run.id])
    assert [j.prefix_key for j in jobs] == ["k0000"] * 4  # one whole prefix group first
    assert all(j.fence == 1 and j.attempts == 1 for j in jobs)
    assert queue.stats(run)["counts"] == {"pending": 8, "running": 4, "done": 0, "error": 0}
    assert queue.unclaimed([run.id]) == 8 and queue.unfinished([run.id]) == 12
    assert queue.held_by_others("w1", [run.id]) == 0 and queue.held_by_others("w2", [run.id]) == 4
    queue.claim("w2", 4, -1, [run.id])  # an expired lease: a dead worker's jobs are nobody's
    assert queue.held_by_others("w1", [run.id]) == 0 and queue.held_by_others("w1", [run.id + 1]) == 0


def test_a_claim_takes_the_priority_groups_first_and_whole(queue):
    """Priority groups (chart answers) come first, in prefix order, then the rest; a claim takes
    the rest of the group its limit ends in, so no group is split between two workers (each
    would prefill its prefix), up to `group_rest` more jobs; without it the limit is exact."""
    job_rows = rows(40, groups=10)  # k0000..k0009, 4 jobs each
    for r in job_rows:
        r["priority"] = int(r["prefix_key"] in ("k0003", "k0005", "k0007"))
    queue.enqueue("r", {}, "h", job_rows)
    run = queue.get_run("r")
    first = queue.claim("w1", 10, 60, [run.id], group_rest=8)  # 10 ends inside the third priority group: all of it
    assert [j.prefix_key for j in first] == ["k0003"] * 4 + ["k0005"] * 4 + ["k0007"] * 4
    second = queue.claim("w2", 5, 60, [run.id], group_rest=8)
    assert [j.prefix_key for j in second] == ["k0000"] * 4 + ["k0001"] * 4
    third = queue.claim("w3", 3, 60, [run.id])
    assert [j.prefix_key for j in third] == ["k0002"] * 3
    fourth = queue.claim("w4", 2, 60, [run.id], group_rest=2)
    assert [j.prefix_key for j in fourth] == ["k0002"] + ["k0004"] * 3  # at most 2 more: the rest of k0004 stays


def test_finish_fail_and_late_results_are_fenced(queue):
    queue.enqueue("r", {}, "h", rows(3))
    run = queue.get_run("r")
    a, b, c = queue.claim("w1", 3, 0.2, [run.id])
    assert queue.finish(a, "w1", {"prediction": "x", "input_tokens": 5})
    assert queue.fail(b, "w1", "oom", "too big")
    time.sleep(0.3)  # c's lease expires: another worker takes it
    (c2,) = queue.claim("w2", 5, 60, [run.id])
    assert (c2.id, c2.fence, c2.attempts) == (c.id, 2, 2)
    assert not queue.finish(c, "w1", {"prediction": "late"})  # the paused worker wakes up: rejected
    assert queue.finish(c2, "w2", {"prediction": "fresh"})
    by_id = {r["query_id"]: r for r in queue.result_rows("r")}
    assert by_id[3]["prediction"] == "fresh" and by_id[3]["attempts"] == 2
    assert by_id[2]["error_kind"] == "oom"
    kinds = [e["kind"] for e in queue.event_log(run.id) if e["job_id"] == c.id]
    assert kinds == ["enqueued", "claimed", "expired", "claimed", "rejected", "finished"]


def test_heartbeat_keeps_lease_and_reports_lost_jobs(queue):
    queue.enqueue("r", {}, "h", rows(2))
    run = queue.get_run("r")
    a, b = queue.claim("w1", 2, 0.3, [run.id])
    assert queue.heartbeat("w1", {a.id: a.fence, b.id: b.fence}, 60) == {a.id, b.id}
    time.sleep(0.4)
    assert queue.claim("w2", 2, 60, [run.id]) == []  # leases were extended
    assert queue.heartbeat("w1", {a.id: a.fence + 1}, 60) == set()  # wrong fence: not ours


def test_release_returns_jobs_without_an_attempt(queue):
    queue.enqueue("r", {}, "h", rows(2))
    run = queue.get_run("r")
    jobs = queue.claim("w1", 2, 60, [run.id])
    assert queue.release(jobs, "w1") == 2
    again = queue.claim("w2", 2, 60, [run.id])
    assert [j.attempts for j in again] == [1, 1] and [j.fence for j in again] == [2, 2]


def test_poison_job_ends_as_crashed(queue):
    queue.enqueue("r", {}, "h", [dict(r, max_attempts=2) for r in rows(1)])
    run = queue.get_run("r")
    for _ in range(2):
        assert len(queue.claim("w", 1, 0.05, [run.id])) == 1
        time.sleep(0.1)
    assert queue.claim("w", 1, 0.05, [run.id]) == []
    (row,) = queue.result_rows("r")
    assert (row["status"], row["error_kind"], row["attempts"]) == ("error", "crashed", 2)


def test_requeue_filters_by_kind_and_ids(queue):
    queue.enqueue("r", {}, "h", rows(4))
    run = queue.get_run("r")
    jobs = queue.claim("w", 4, 60, [run.id])
    for job, kind in zip(jobs, ["oom", "oom", "timeout", "bad_format"]):
        queue.fail(job, "w", kind, "x")
    assert queue.requeue(run.id, ["oom"], {2, 3}) == 1
    assert queue.requeue(run.id, ["oom", "timeout"]) == 2
    assert queue.stats(run)["counts"] == {"pending": 3, "running": 0, "done": 0, "error": 1}
    assert queue.event_counts(run.id)["requeued"] == 3


def test_concurrent_claimers_never_share_a_job(db_url):
    open_queue(db_url).enqueue("r", {}, "h", rows(300, groups=40))
    seen, lock, errors = [], threading.Lock(), []

    def claimer(name):
        q = open_queue(db_url, migrate=False)
        run = q.get_run("r")
        try:
            while jobs := q.claim(name, 7, 60, [run.id]):
                with lock:
                    seen.extend(j.id for j in jobs)
                for j in jobs:
                    assert q.finish(j, name, {"prediction": name})
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert len(seen) == len(set(seen)) == 300
