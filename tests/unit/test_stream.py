"""The stream's Feeder thread: lots claimed while others run, each lot handed on in one piece,
claims bounded by the backlog and ended by stop, errors reach the taker."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from hitq.workers.stream import SHARE, Feeder, lots

KEYS = ["a", "a", "b", "b", "b", "c", "d", "d", None, None]


def _claims(keys, lot_log):
    """claim(n) as Queue.claim does it: n jobs and the rest of the last one's prefix group."""
    jobs = [SimpleNamespace(id=i, prefix_key=k) for i, k in enumerate(keys)]

    def claim(n):
        while n < len(jobs) and jobs[n - 1].prefix_key is not None and jobs[n].prefix_key == jobs[n - 1].prefix_key:
            n += 1
        got, jobs[:] = jobs[:n], jobs[n:]
        lot_log.append(len(got))
        return got
    return claim


def _drain(feeder):
    handed = []
    while (items := feeder.take(True)) is not None:
        handed.append(items)
        feeder.started(len(items))  # the engine starts and finishes what it takes at once
        feeder.finished(len(items))
    return handed


def test_claimed_groups_reach_the_taker_whole_and_failed_jobs_are_counted():
    lots: list[int] = []
    feeder = Feeder(_claims(KEYS, lots), lambda job: None if job.id == 5 else job, lot=3, backlog=100, stopping=lambda: False)
    feeder.start()
    handed = [[j.id for j in items] for items in _drain(feeder)]
    feeder.join()
    assert sorted(i for ids in handed for i in ids) == [0, 1, 2, 3, 4, 6, 7, 8, 9]  # job 5 failed in prepare
    for ids in handed:  # a group never spans two hand-outs
        keys = {KEYS[i] for i in ids if KEYS[i]}
        assert all(sum(KEYS[i] == k for i in ids) == KEYS.count(k) for k in keys)
    assert lots == [5, 3, 2, 0] and feeder.unfinished == 0  # a + all of b; c, d; the rest


def test_a_first_claim_is_cut_into_lots_between_groups():
    jobs = [SimpleNamespace(id=i, prefix_key=k) for i, k in enumerate(KEYS)]
    assert [[KEYS[j.id] for j in lot] for lot in lots(jobs, 3)] == [["a", "a", "b", "b", "b"], ["c", "d", "d"], [None, None]]
    assert [len(lot) for lot in lots(jobs, 1)] == [2, 3, 1, 2, 1, 1]


def test_backlog_bounds_claims_and_stop_ends_the_claims():
    lots: list[int] = []
    stop = threading.Event()
    feeder = Feeder(_claims(KEYS, lots), lambda job: job, lot=3, backlog=3, stopping=stop.is_set)
    feeder.start()
    items = feeder.take(True)
    assert [j.id for j in items] == [0, 1, 2, 3, 4] and lots == [5]  # a, and all of b; 5 claimed >= backlog
    stop.set()
    assert _drain(feeder) == [] and lots == [5]
    feeder.join()


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
    items = feeder.take(True)  # taken, not started: still no claim
    time.sleep(0.3)
    assert lots == [3] and feeder.unstarted == 3
    feeder.started(3)
    feeder.finished(3)
    entries = _drain(feeder)
    feeder.join()
    handed = items + [j for got in entries for j in got]
    assert sorted(j.id for j in handed) == list(range(12)) and lots == [3, 3, 3, 3, 0]


def test_lots_shrink_near_the_end_of_the_queue():
    """Told how many jobs nobody has claimed, a lot takes at most 1/SHARE of them (one at least):
    the workers' last jobs split evenly instead of one worker holding the last full lot."""
    jobs, lots = [SimpleNamespace(id=i, prefix_key=None) for i in range(40)], []

    def claim(n):
        got, jobs[:] = jobs[:n], jobs[n:]
        lots.append(len(got))
        return got

    others = iter([3, 0])  # other workers' jobs, asked before each claim: then none
    feeder = Feeder(claim, lambda job: job, lot=8, backlog=100, stopping=lambda: False, unclaimed=lambda: len(jobs),
                    others=lambda: next(others, 0))
    assert feeder.shared  # until told
    feeder.start()
    entries = _drain(feeder)
    feeder.join()
    assert sorted(j.id for items in entries for j in items) == list(range(40))
    assert lots[0] == 40 // SHARE and lots == sorted(lots, reverse=True) and lots[-2:] == [1, 0]
    assert not feeder.shared
