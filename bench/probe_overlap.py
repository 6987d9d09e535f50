"""Can decode steps run while a prefix is prefilled, on two CUDA streams? (run on the GPU machine)

Builds the 8B architecture with random bf16 weights and a KV arena, then for one text prefix of
T tokens and a set of live decode rows: times the prefix alone (forward_text, as fastgen.run
prefills), one CUDA-graph decode step alone, and the prefix prefilled by a second host thread on
its own stream while the main thread runs decode steps (graph replay + token read-back, as
fastgen.run does) on a high- or normal-priority stream until the prefix is done. A step that
overlaps perfectly costs nothing: `extra_ms_per_step` = (wall - prefix alone) / steps, to set
against `step_ms` alone.

    python bench/probe_overlap.py MODEL_DIR > bench/probe-overlap-<gpu>.json
"""
import json
import sys
import threading
import time
from types import SimpleNamespace

import torch
from probe_setup import build, live_rows

from hitq.engine import fastgen
from hitq.engine.measure import clock

POSITIONS, ROWS, PREFIX_AT = 300_000, 64, 200_000
engine, model, arena, out = build(POSITIONS, ROWS)

LIVE = {"8 rows, 20k each": live_rows(8, 20_000), "4 rows, 12k each": live_rows(4, 12_000), "1 row, 2k": live_rows(1, 2_000)}


def prefix(T):
    ids = torch.randint(1000, model.config.text_config.vocab_size - 1000, (1, T))
    g = SimpleNamespace(split=T, rows=[SimpleNamespace(prepared=SimpleNamespace(inputs={"input_ids": ids}))])
    return lambda: fastgen.forward_text(model, arena, *fastgen.Chunks(g, (PREFIX_AT, []), "cuda", T).next())


def overlapped(fill, decoder, live, priority):
    """(wall s, steps) of fill() on a thread and its stream while this thread steps on another."""
    fill_stream, step_stream = torch.cuda.Stream(), torch.cuda.Stream(priority=priority)
    done = threading.Event()

    def background():
        with torch.inference_mode(), torch.cuda.stream(fill_stream):
            fill()
            fill_stream.synchronize()
        done.set()

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    thread = threading.Thread(target=background)
    thread.start()
    steps = 0
    with torch.cuda.stream(step_stream):
        while not done.is_set():
            decoder.step(live)
            steps += 1
    thread.join()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, steps


with torch.inference_mode():
    decoder = fastgen.Decoder(model, arena, ROWS, POSITIONS, engine.eos_ids, graphs=True)
    for T in (16_384, 60_000):
        fill = prefix(T)
        alone = clock(fill, 2)
        for shape, live in LIVE.items():
            step = clock(lambda: decoder.step(live), 10)
            row = {"prefix_s": round(alone, 4), "step_ms": round(1e3 * step, 2)}
            for name, priority in (("high", -1), ("normal", 0)):
                overlapped(fill, decoder, live, priority)  # warm-up: the thread's first call
                wall, steps = overlapped(fill, decoder, live, priority)
                row[f"{name} priority"] = {"wall_s": round(wall, 4), "steps": steps,
                                           "extra_ms_per_step": round(1e3 * (wall - alone) / max(steps, 1), 2)}
            out[f"prefix {T}, {shape}"] = row
            print(T, shape, row, file=sys.stderr, flush=True)
json.dump(out, sys.stdout, indent=1)
print()
