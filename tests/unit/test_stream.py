"""The stream's Feeder thread: lots claimed while others run, prefix groups kept whole, stop
gives back what was not handed out, errors reach the taker."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from hitq.workers.stream import SHARE, Feeder

KEYS = ["a", "a", "b", "b", "b", "c", "d", "d", None, None]


def _claims(keys, lot_log):
    jobs = [SimpleNamespace(id=i, prefix_key=k) for i, k in enumerate(keys)]

    def claim(n):
        got, jobs[:] = jobs[:n], jobs[n:]
        lot_log.append(len(got))
        return got
    return claim


def _drain(feeder):
    entries = []
    while (got := feeder.take(True)) is not None:
        entries.append(got)
        feeder.started(len(got[0]))  # the engine starts and finishes what it takes at once
        feeder.finished(len(got[0]))
    return entries


def test_lots_keep_prefix_groups_whole_and_failed_jobs_are_counted():
    lots: list[int] = []
    feeder = Feeder(_claims(KEYS, lots), lambda job: None if job.id == 5 else job, lot=3, backlog=100, stopping=lambda: False)
    feeder.start()
    entries = _drain(feeder)
    feeder.join()
    handed = [[j.id for j in items] for items, _ in entries if items]
    assert sorted(i for ids in handed for i in ids) == [0, 1, 2, 3, 4, 6, 7, 8, 9]  # job 5 failed in prepare
    for ids in handed:  # a group never spans two hand-outs
        keys = {KEYS[i] for i in ids if KEYS[i]}
        assert all(sum(KEYS[i] == k for i in ids) == KEYS.count(k) for k in keys)
    assert lots == [3, 3, 3, 1, 0] and feeder.unfinished == 0


def test_a_held_group_continued_after_a_priority_group_is_handed_out_once():
    """A claim returns its priority groups first, so the rest of a held group can come after
    another group's jobs: the held group is every job of its key, not the lot's last ones."""
    keys = ["a", "x", "x", "p", "p", "x", "y", "y", "y"]  # lot 1 ends inside x; lot 2 starts with priority group p
    lots: list[int] = []
    feeder = Feeder(_claims(keys, lots), lambda job: job, lot=3, backlog=100, stopping=lambda: False)
    feeder.start()
    entries = _drain(feeder)
    feeder.join()
    handed = [j.id for items, _ in entries for j in items]
    assert sorted(handed) == list(range(len(keys)))  # each job once: none twice, none lost
    for items, _ in entries:  # a group never spans two hand-outs
        ids = [j.id for j in items]
        assert all(sum(keys[i] == k for i in ids) == keys.count(k) for k in {keys[i] for i in ids})


def test_a_group_larger_than_a_lot_is_claimed_on_and_handed_out_whole_within_the_backlog():
    keys = ["g"] * 10 + ["h", "h"]
    for backlog, parts in ((100, [10]), (8, [8, 2])):  # a group past the backlog goes out in parts: no deadlock
        lots: list[int] = []
        feeder = Feeder(_claims(keys, lots), lambda job: job, lot=4, backlog=backlog, stopping=lambda: False)
        feeder.start()
        entries = _drain(feeder)
        feeder.join()
        handed = [[keys[j.id] for j in items] for items, _ in entries if items]
        assert [ks.count("g") for ks in handed if "g" in ks] == parts and sorted(k for ks in handed for k in ks) == sorted(keys)


def test_backlog_bounds_claims_and_stop_gives_back_the_held_group():
    lots: list[int] = []
    stop = threading.Event()
    feeder = Feeder(_claims(KEYS, lots), lambda job: job, lot=3, backlog=3, stopping=stop.is_set)
    feeder.start()
    items, given_back = feeder.take(True)
    assert [j.id for j in items] == [0, 1] and lots == [3]  # b is held for its other jobs; 3 claimed >= backlog
    stop.set()
    rest = _drain(feeder)
    assert [j.id for _, back in rest for j in back] == [2] and lots == [3]


def test_an_error_of_the_thread_reaches_the_taker():
    def claim(n):
        raise RuntimeError("database away")

    feeder = Feeder(claim, lambda job: job, lot=2, backlog=4, stopping=lambda: False)
    feeder.start()
    with pytest.raises(RuntimeError, match="database away"):
        feeder.take(True)


def test_no_lot_is_claimed_while_a_lot_waits_unstarted():
    """The feeder claims only while fewer than a lot are prepared and not yet started, so a worker
    whose engine is busy (a long answer's paced steps) leaves the queue's jobs to the others."""
    lots: list[int] = []
    feeder = Feeder(_claims([None] * 12, lots), lambda job: job, lot=3, backlog=100, stopping=lambda: False)
    feeder.start()
    until = time.monotonic() + 5
    while sum(lots) < 3 and time.monotonic() < until:
        time.sleep(0.01)
    time.sleep(0.3)  # time for more claims, were they allowed
    assert lots == [3] and feeder.unstarted == 3
    items, _ = feeder.take(True)  # taken, not started: still no claim
    time.sleep(0.3)
    assert lots == [3] and feeder.unstarted == 3
    feeder.started(3)
    feeder.finished(3)
    entries = _drain(feeder)
    feeder.join()
    handed = items + [j for got, _ in entries for j in got]
    assert sorted(j.id for j in handed) == list(range(12)) and lots == [3, 3, 3, 3, 0]


def test_lots_shrink_near_the_end_of_the_queue():
    """Told how many jobs nobody has claimed, a lot takes at most 1/SHARE of them (one at least):
    the workers' last jobs split evenly instead of one worker holding the last full lot."""
    jobs, lots = [SimpleNamespace(id=i, prefix_key=None) for i in range(40)], []

    def claim(n):
        got, jobs[:] = jobs[:n], jobs[n:]
        lots.append(len(got))
        return got

    feeder = Feeder(claim, lambda job: job, lot=8, backlog=100, stopping=lambda: False, unclaimed=lambda: len(jobs))
    feeder.start()
    entries = _drain(feeder)
    feeder.join()
    assert sorted(j.id for items, _ in entries for j in items) == list(range(40))
    assert lots[0] == 40 // SHARE and lots == sorted(lots, reverse=True) and lots[-2:] == [1, 0]
