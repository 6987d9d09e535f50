"""A fast engine for queue mechanics (load, chaos, CLI tests): no model, deterministic answers.

It can be told to misbehave on chosen keys (query ids), so the fault-tolerance of the worker
and supervisor can be tested with real processes: `oom` raises EngineOOM, `error` raises
EngineError, `crash` kills the process (os._exit), `hang` sleeps for an hour, `noanswer`
answers without the `[Final Answer]:` marker. Faults come from
the engine options (`--engine-opt oom=3,7`) or $HITQ_FAKE_FAULTS (`oom=3,7;crash=5`).
With `stream=true` it also takes jobs as a stream (what the transformers engine's fast path
does on a GPU), so the worker's stream path meets the same faults, signals and chaos.
"""
from __future__ import annotations

import os
import time
from typing import Any

from hitq.engine.base import GenerationSettings, ImageLimits, Output, Prepared, TokenCount
from hitq.errors import EngineError, EngineOOM

FAULTS = ("oom", "error", "crash", "hang", "noanswer")


def _keys(spec) -> set[int]:
    if isinstance(spec, (list, set, tuple)):
        return {int(k) for k in spec}
    return {int(k) for k in str(spec).replace(" ", "").split(",") if k}


class FakeEngine:
    name = "fake"

    def __init__(self, delay_s: float | str = 0.0, stream: bool | str = False, **faults):
        self.delay_s = float(delay_s)
        self.streaming = str(stream).lower() in ("1", "true", "yes")
        env = dict(part.split("=", 1) for part in os.environ.get("HITQ_FAKE_FAULTS", "").split(";") if "=" in part)
        self.faults = {kind: _keys(faults.get(kind, env.get(kind, ""))) for kind in FAULTS}
        self.calls: list[list[Any]] = []  # keys of every generate call, for tests

    def count_tokens(self, messages: list[dict], images: ImageLimits) -> TokenCount:
        chars = sum(len(p.get("text", "")) for m in messages for p in _parts(m))
        n_images = sum(p.get("type") == "image" for m in messages for p in _parts(m))
        return TokenCount(tokens=chars // 4 + 64 * n_images + 8)

    def prepare(self, key, messages, images, max_new_tokens, stop_at_answer=False, prefix_key=None) -> Prepared:
        return Prepared(key=key, inputs=messages, count=self.count_tokens(messages, images), max_new_tokens=max_new_tokens,
                        stop_at_answer=stop_at_answer, prefix_key=prefix_key)

    def generate(self, batch: list[Prepared], settings: GenerationSettings) -> list[Output]:
        self.calls.append([p.key for p in batch])
        keys = {int(p.key) for p in batch}
        if keys & self.faults["crash"]:
            os._exit(17)
        if keys & self.faults["hang"]:
            time.sleep(3600)
        if keys & self.faults["oom"]:
            raise EngineOOM(f"fake OOM on a batch of {len(batch)} ({sum(p.count.tokens for p in batch)} tokens)")
        if keys & self.faults["error"]:
            raise EngineError("fake engine error")
        outputs = []
        for p in batch:
            start = time.perf_counter()
            time.sleep(self.delay_s)
            marker = "" if int(p.key) in self.faults["noanswer"] else "[Final Answer]: "
            text = f"Echo of {p.count.tokens} prompt tokens.\n{marker}{p.key}"
            outputs.append(Output(key=p.key, text=text, output_tokens=len(text) // 4, seconds=time.perf_counter() - start))
        return outputs

    def can_stream(self, settings: GenerationSettings) -> bool:
        return self.streaming

    def stream(self, feed, done, longest: int, images: bool, stopping=lambda: False, started=lambda batch: None,
               shared=lambda: True) -> list[Prepared]:
        """One request at a time as feed hands them out (see TransformersEngine.stream)."""
        given_back: list[Prepared] = []
        while (batch := feed(True)) is not None:
            for p in batch:
                if stopping():
                    given_back.append(p)
                    continue
                started([p])
                try:
                    done(p, self.generate([p], GenerationSettings())[0])
                except EngineOOM as e:  # like a request larger than the arena
                    done(p, e)
            if stopping():
                return given_back
        return given_back

    def describe(self) -> dict:
        return {"engine": "fake", "device": "cpu", "delay_s": self.delay_s, "stream": self.streaming}


def _parts(message: dict) -> list[dict]:
    content = message.get("content", "")
    return [{"type": "text", "text": content}] if isinstance(content, str) else content
