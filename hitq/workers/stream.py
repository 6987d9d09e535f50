"""Claim and prepare jobs on a thread while the GPU generates (Executor.run_stream).

The engine's stream asks for work between decode steps; a Feeder has it ready: it claims a lot
of jobs whenever fewer than a lot are prepared and not yet started by the engine and fewer than
`backlog` are claimed and unfinished, prepares them (fitting, tokenising, images: CPU work, mostly
in the tokenizer's Rust code with the GIL released) and queues them. So a worker holds few jobs
it has not started: when the queue runs dry, the others are not left idle while it works through
a hoard. Near the end of the queue a lot is at most 1/SHARE of the jobs nobody has claimed (down
to one job), so the workers' last jobs split evenly. The claim completes the lot's last prefix
group (Queue.claim's `group_rest`), and a lot goes to the engine as one piece, so each group is
prefilled once. Before each claim it also asks whether other workers hold jobs of the run
(`shared`): the engine paces its long answers only then. Errors of the thread (the database
away) reach the main thread at its next `take`.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable

SHARE = 8  # a lot takes at most 1/SHARE of the unclaimed jobs (when the Feeder is told how many)


def lots(jobs: list, size: int) -> list[list]:
    """`jobs` (claimed in prefix-group order) in lots of at least `size`, cut only between groups."""
    out: list[list] = []
    for job in jobs:
        if out and (len(out[-1]) < size or job.prefix_key is not None and job.prefix_key == out[-1][-1].prefix_key):
            out[-1].append(job)
        else:
            out.append([job])
    return out


class Feeder(threading.Thread):
    def __init__(self, claim: Callable[[int], list], prepare: Callable[[object], object | None],
                 lot: int, backlog: int, stopping: Callable[[], bool], unclaimed: Callable[[], int] | None = None,
                 others: Callable[[], int] | None = None):
        """claim(n) -> up to n jobs ([] when none are left); prepare(job) -> a prepared Item, or
        None when the job failed (recorded by `prepare`); unclaimed() -> jobs nobody has claimed;
        others() -> jobs other workers hold, asked before each claim (`shared`)."""
        super().__init__(daemon=True, name="hitq-feeder")
        self.claim, self.prepare, self.lot, self.backlog, self.stopping = claim, prepare, lot, backlog, stopping
        self.unclaimed, self.others = unclaimed, others
        self.shared = True  # other workers held jobs of the run at the last claim (True when not told)
        self.ready: queue.Queue = queue.Queue()
        self.unfinished = 0  # claimed, not yet finished or given back
        self.unstarted = 0  # prepared and queued, not yet started by the engine
        self.lock = threading.Lock()
        self.room = threading.Condition(self.lock)
        self.error: BaseException | None = None
        self.ended = False  # the end mark was taken

    def started(self, n: int) -> None:
        """n of the queued jobs stopped waiting in the engine (started, or refused as too large)."""
        with self.room:
            self.unstarted -= n
            self.room.notify()

    def finished(self, n: int = 1) -> None:
        with self.room:
            self.unfinished -= n
            self.room.notify()

    def run(self) -> None:
        try:
            while not self.stopping():
                lot = self.lot if self.unclaimed is None else max(1, min(self.lot, self.unclaimed() // SHARE))
                with self.room:
                    while (self.unfinished >= self.backlog or self.unstarted >= lot) and not self.stopping():
                        self.room.wait(0.5)
                if self.others is not None:
                    self.shared = self.others() > 0
                new = [] if self.stopping() else self.claim(lot)
                with self.lock:
                    self.unfinished += len(new)
                if not new:
                    break
                self._prepare(new)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e
        finally:
            self.ready.put(None)  # the end mark

    def _prepare(self, jobs: list) -> None:
        """Queue the lot as one entry: a prefix group must reach the engine in one piece."""
        items = []
        for job in jobs:
            item = self.prepare(job)
            if item is None:
                self.finished()
            else:
                items.append(item)
        with self.lock:
            self.unstarted += len(items)
        self.ready.put(items)

    def take(self, wait: bool) -> list | None:
        """The prepared items queued so far; with wait, at least one lot unless the feeder ends.
        None once it has ended and everything was taken."""
        items: list = []
        while not (self.ended and self.ready.empty()):
            try:
                lot = self.ready.get(block=wait and not items, timeout=0.5)
            except queue.Empty:
                if self.error is None and wait and not items:
                    continue
                break
            if lot is None:
                self.ended = True
            else:
                items.extend(lot)
        if self.error is not None:
            raise self.error
        if self.ended and not items:
            return None
        return items
