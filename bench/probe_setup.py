"""What the GPU probes share: the 8B architecture with random bf16 weights (model directory in
sys.argv[1]) and a KV arena of random keys and values, the JSON's header, a timer that also keeps
the host's time, and live decode rows for Decoder.step."""
import sys
import time

import torch

from hitq.engine import fastgen
from hitq.engine.qwen3vl import TransformersEngine


def build(positions: int, rows: int = 64):
    """(engine, model, arena, the JSON's header)."""
    engine = TransformersEngine(sys.argv[1], device="cuda", random_weights=True)
    arena = fastgen.Arena(engine.model, positions)
    for t in arena.k + arena.v:
        t.normal_()
    return engine, engine.model, arena, {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}


def timed(fn, n: int) -> dict:
    """Seconds per call and host seconds per call until fn returned (CPU-bound when close to the
    seconds), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    t0, host = time.perf_counter(), 0.0
    for _ in range(n):
        h0 = time.perf_counter()
        fn()
        host += time.perf_counter() - h0
    torch.cuda.synchronize()
    return {"s": round((time.perf_counter() - t0) / n, 4), "host_s": round(host / n, 4)}


def live_rows(n: int, length: int) -> dict:
    """n decode rows of `length` context each, side by side from position 0: decode position ->
    (token, rope position, ((prefix start, length), (own start, length)), forced)."""
    return {i: (100 + i, length, ((i * (length + 100), length - 40), (i * (length + 100) + length - 40, 39)), True)
            for i in range(n)}
