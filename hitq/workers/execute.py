"""One run's jobs through one engine: prepare → generate (OOM ladder) → extract → finish or fail.

The OOM ladder: a batch that runs out of memory is split in halves; a single job is retried with
a quarter of the image pixels and half of the token budget (twice), each step recorded in the
job's `details.oom_ladder`; after that the job fails with kind `oom` and the sizes tried.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hitq.benchmark import answer, prompts
from hitq.benchmark.preflight import prepare_query
from hitq.benchmark.query import Query
from hitq.engine.base import GenerationSettings, ImageLimits, Output, Prepared
from hitq.errors import BadFormat, EngineOOM, HitqError, JobError
from hitq.jobqueue import Job, Queue, Run
from hitq.runconfig import RunConfig
from hitq.workers.stream import Feeder, lots

log = logging.getLogger("hitq.worker")
LADDER = ((0.25, 0.5), (0.0625, 0.25))  # (pixel factor, token budget factor) of each OOM retry


@dataclass
class Item:
    """A job on its way through the engine, with what was measured so far."""

    job: Job
    query: Query
    config: RunConfig
    started: float = field(default_factory=time.perf_counter)
    fitted: object = None
    prepared: Prepared | None = None
    details: dict = field(default_factory=dict)

    def measures(self) -> dict:
        f, c = self.fitted, self.prepared.count if self.prepared else None
        out = {"processing_time": round(time.perf_counter() - self.started, 2), "details": self.details or None}
        if f is not None:
            out.update(original_tokens=f.original_tokens, input_tokens=f.input_tokens, truncated=f.truncated, rows_dropped=f.rows_dropped)
        if c is not None:
            out.update(input_tokens=c.tokens, image_pixels_before=c.image_pixels_before, image_pixels_after=c.image_pixels_after)
        return out


def query_of(job: Job) -> Query:
    return Query(job.query_id, job.file_name, job.question_type, job.sub_q_type, job.question, job.reference)


class Executor:
    """Runs claimed jobs of `run` on `engine` and records every outcome in the queue."""

    def __init__(self, queue: Queue, worker: str, run: Run, engine):
        self.queue, self.worker, self.run, self.engine = queue, worker, run, engine
        self.config = RunConfig.from_json(run.config)
        self.prompt_set = prompts.load_prompt_set(self.config.prompts, self.config.data_dir)
        if self.config.prompts_hash and self.prompt_set.sha256 != self.config.prompts_hash:
            raise HitqError(f"run {run.name}: prompt set {self.config.prompts!r} changed since enqueue; enqueue a new run")
        c = self.config
        self.settings = GenerationSettings(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, seed=c.seed)

    def run_batch(self, jobs: list[Job]) -> dict[str, int]:
        """Run `jobs` to a recorded outcome each. Returns counts of done / error / rejected."""
        items = [Item(job, query_of(job), self.config) for job in jobs]
        ready = [item for item in items if self._prepare(item)]
        outcome = {"done": 0, "error": 0, "rejected": 0}
        for item, result in self._generate(ready):
            if isinstance(result, JobError):
                self._fail(item, result, outcome)
            else:
                self._answer(item, result, outcome)
        return outcome

    def streams(self) -> bool:
        """Whether the engine can take this run's jobs as a stream (greedy fast path)."""
        can = getattr(self.engine, "can_stream", None)
        return bool(can and can(self.settings))

    def run_stream(self, first: list[Job], claim: Callable[[int], list[Job]], hold: Callable[[list[Job]], None],
                   stopping: Callable[[], bool], batch: int) -> dict[str, int]:
        """Run `first` and every job `claim` gives after it through one engine stream: a Feeder
        thread claims and prepares lots of batch / 8 jobs while the GPU generates (up to `batch`
        claimed and unfinished: enough to fill the decode rows and the KV arena, few enough
        that workers on several GPUs run out of work together), and each job is recorded as
        soon as its request stops. `hold` gets the jobs in hand whenever they change (leases,
        the supervisor's view). Format retries and the OOM ladder run one at a time after the
        stream. Once `stopping()`, no job is started and the unstarted ones are released."""
        outcome = {"done": 0, "error": 0, "rejected": 0}
        lock, aborted = threading.Lock(), threading.Event()
        in_hand: dict[int, Job] = {}
        fed: dict = {}  # query id -> Item, handed to the engine
        later: list[tuple[Item, Output | EngineOOM | None]] = []  # None: to run again (the stream ran out of memory)
        lot = max(1, batch // 8)
        pending_first = lots(first, lot)[::-1]

        def held(add=(), drop=()) -> None:
            with lock:
                in_hand.update((j.id, j) for j in add)
                for j in drop:
                    in_hand.pop(j.id, None)
                hold(list(in_hand.values()))

        def claim_lot(n: int) -> list[Job]:
            jobs = pending_first.pop() if pending_first else claim(n)
            held(add=jobs)
            return jobs

        def prepare(job: Job) -> Item | None:
            item = Item(job, query_of(job), self.config)
            if self._prepare(item):
                return item
            held(drop=[job])
            return None

        feeder = Feeder(claim_lot, prepare, lot, batch, lambda: stopping() or aborted.is_set(),
                        lambda: self.queue.unclaimed([self.run.id]), lambda: self.queue.held_by_others(self.worker, [self.run.id]))

        def give_back(jobs: list[Job]) -> None:
            if jobs:
                self.queue.release(jobs, self.worker)
                held(drop=jobs)
                feeder.finished(len(jobs))

        def feed(idle: bool) -> list[Prepared] | None:
            items = feeder.take(idle)
            if items is None:
                return None
            fed.update((i.job.query_id, i) for i in items)
            return [i.prepared for i in items]

        def done(prepared: Prepared, result: Output | EngineOOM) -> None:
            item = fed.pop(prepared.key)
            feeder.finished()  # out of the stream: room for another job
            if isinstance(result, EngineOOM) or (self.config.format_retries and answer.extract(result.text) is None):
                later.append((item, result))  # still in hand, run after the stream
                return
            self._answer(item, result, outcome)
            held(drop=[item.job])

        feeder.start()
        try:
            unstarted = self.engine.stream(feed, done, self.config.max_input_tokens, self.config.modality != "text",
                                           lambda: stopping() or aborted.is_set(),
                                           lambda requests: feeder.started(len(requests)), lambda: feeder.shared)
            give_back([fed.pop(p.key).job for p in unstarted])
        except EngineOOM as e:  # the stream ran out of memory: what it held goes the one-batch way
            log.warning("stream: %s: %d requests continue in batches", e, len(fed), extra={"action": "oom_split"})
            aborted.set()
            later += [(item, None) for item in fed.values()]
            fed.clear()
        finally:
            aborted.set()
            feeder.join()
        while (items := feeder.take(False)) is not None:  # prepared, never fed: back to the queue
            give_back([i.job for i in items])
        again = self._generate([item for item, result in later if result is None])
        for item, result in again + [(i, self._ladder(i, r) if isinstance(r, EngineOOM) else r) for i, r in later if r is not None]:
            if isinstance(result, JobError):
                self._fail(item, result, outcome)
            else:
                self._answer(item, result, outcome)
            held(drop=[item.job])
        if in_hand:  # nothing should be left; if it were, its lease must not be extended forever
            log.warning("stream: %d jobs left in hand: released", len(in_hand), extra={"action": "released"})
            give_back(list(in_hand.values()))
        return outcome

    # -- steps ---------------------------------------------------------------------------------
    def _prepare(self, item: Item) -> bool:
        try:
            self._fit(item, item.config)
            return True
        except JobError as e:
            self._fail(item, e, {"error": 0, "rejected": 0})
            return False

    def _fit(self, item: Item, config: RunConfig, messages: list | None = None) -> None:
        limits = ImageLimits(config.min_pixels, config.max_pixels)
        if messages is None:
            item.fitted = prepare_query(item.query, config, self.prompt_set, self.engine.count_tokens)
            messages = item.fitted.messages
        item.prepared = self.engine.prepare(
            key=item.job.query_id, messages=messages, images=limits,
            max_new_tokens=config.max_new_tokens or prompts.default_max_new_tokens(item.query),
            stop_at_answer=not prompts.is_open_ended(item.query), prefix_key=item.job.prefix_key,
        )

    def _generate(self, items: list[Item]) -> list[tuple[Item, Output | JobError]]:
        if not items:
            return []
        try:
            outputs = self.engine.generate([i.prepared for i in items], self.settings)
            by_key = {o.key: o for o in outputs}
            return [(i, by_key[i.job.query_id]) for i in items]
        except EngineOOM as e:
            if len(items) > 1:
                log.warning("OOM on a batch of %d: splitting", len(items), extra={"action": "oom_split"})
                half = len(items) // 2
                return self._generate(items[:half]) + self._generate(items[half:])
            return [(items[0], self._ladder(items[0], e))]
        except JobError as e:
            return [(i, e) for i in items]

    def _ladder(self, item: Item, first: EngineOOM) -> Output | JobError:
        """Retry one job with fewer image pixels and a smaller token budget."""
        steps = item.details.setdefault("oom_ladder", [])
        steps.append({"max_pixels": item.config.max_pixels, "max_input_tokens": item.config.max_input_tokens,
                      "input_tokens": item.prepared.count.tokens, "error": str(first)})
        for pixel_factor, token_factor in LADDER:
            config = dataclasses.replace(
                self.config, max_pixels=max(self.config.min_pixels, int(self.config.max_pixels * pixel_factor)),
                max_input_tokens=int(self.config.max_input_tokens * token_factor),
            )
            try:
                self._fit(item, config)
                log.warning("OOM on query %d: retrying with max_pixels %d, budget %d tokens", item.job.query_id,
                            config.max_pixels, config.max_input_tokens, extra={"action": "oom_retry"})
                output = self.engine.generate([item.prepared], self.settings)[0]
                steps.append({"max_pixels": config.max_pixels, "max_input_tokens": config.max_input_tokens,
                              "input_tokens": item.prepared.count.tokens, "error": None})
                item.config = config
                return output
            except EngineOOM as e:
                steps.append({"max_pixels": config.max_pixels, "max_input_tokens": config.max_input_tokens,
                              "input_tokens": item.prepared.count.tokens, "error": str(e)})
            except JobError as e:
                return e
        tried = "; ".join(f"{s['input_tokens']} tokens, max_pixels {s['max_pixels']}" for s in steps)
        return EngineOOM(f"out of memory at every size tried ({tried})")

    def _answer(self, item: Item, output: Output, outcome: dict) -> None:
        """Extract `[Final Answer]:`, retrying with the format reminder when it is missing."""
        raw = [output.text]
        output_tokens = output.output_tokens
        extracted = answer.extract(output.text)
        for _ in range(self.config.format_retries if extracted is None else 0):
            try:
                self._fit(item, item.config, self._reminder_messages(item))
                retry = self.engine.generate([item.prepared], self.settings)[0]
            except JobError as e:
                self._fail(item, e, outcome)
                return
            raw.append(retry.text)
            output_tokens += retry.output_tokens
            extracted = answer.extract(retry.text)
            if extracted is not None:
                break
        if len(raw) > 1:
            item.details["format_retries"] = len(raw) - 1
        result = dict(item.measures(), raw_output="\n\n=== retry ===\n\n".join(raw), output_tokens=output_tokens)
        if extracted is None:
            self._fail(item, BadFormat(f"no [Final Answer]: line after {len(raw)} tries"), outcome, result)
            return
        ok = self.queue.finish(item.job, self.worker, dict(result, prediction=extracted))
        outcome["done" if ok else "rejected"] += 1

    def _reminder_messages(self, item: Item) -> list:
        """The retry prompt: the fitted messages plus the format reminder, re-fitted with a budget
        smaller by the reminder's own tokens, so that a retry never exceeds --max-input-tokens."""
        note = self.prompt_set.answer_format(item.query)
        limits = ImageLimits(item.config.min_pixels, item.config.max_pixels)
        messages = prompts.reminder(item.fitted.messages, note)
        extra = self.engine.count_tokens(messages, limits).tokens - self.engine.count_tokens(item.fitted.messages, limits).tokens
        if item.fitted.input_tokens + extra > item.config.max_input_tokens:
            smaller = dataclasses.replace(item.config, max_input_tokens=item.config.max_input_tokens - extra)
            messages = prompts.reminder(prepare_query(item.query, smaller, self.prompt_set, self.engine.count_tokens).messages, note)
        return messages

    def _fail(self, item: Item, error: JobError, outcome: dict, result: dict | None = None) -> None:
        log.warning("query %d failed: %s: %s", item.job.query_id, error.kind, error, extra={"action": "fail_job"})
        ok = self.queue.fail(item.job, self.worker, error.kind, str(error), result or item.measures())
        outcome["error" if ok else "rejected"] = outcome.get("error" if ok else "rejected", 0) + 1
