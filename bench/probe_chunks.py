"""What prefilling a prefix in chunks beside decode steps costs (fastgen.run with prefill_chunk), on the GPU machine.

Builds the 8B architecture with random bf16 weights and a KV arena, then times, for one text
prefix of T tokens: the prefix at once (forward_text, as run prefills without chunks); the same
prefix in chunks of C tokens alone; the chunks each in one forward with a decode step of 8 live
rows of 20k context (Decoder.step_with, as run does); and as many CUDA-graph decode steps alone.
Each with the host time until the calls returned (CPU-bound when close to the total) and one
mixed step's kernels by CUDA time (torch.profiler).

    python bench/probe_chunks.py MODEL_DIR > bench/probe-chunks-<gpu>.json
"""
import json
import sys
from types import SimpleNamespace

import torch
from probe_setup import build, live_rows, timed

from hitq.engine import fastgen

POSITIONS, ROWS, PREFIX_AT = 300_000, 64, 170_000
engine, model, arena, out = build(POSITIONS, ROWS)
live = live_rows(8, 20_000)


def group(T):
    ids = torch.randint(1000, model.config.text_config.vocab_size - 1000, (1, T))
    return SimpleNamespace(split=T, rows=[SimpleNamespace(prepared=SimpleNamespace(inputs={"input_ids": ids}))])


with torch.inference_mode():
    decoder = fastgen.Decoder(model, arena, ROWS, POSITIONS, engine.eos_ids, graphs=True)
    mixer = fastgen.Decoder(model, arena, ROWS, POSITIONS, engine.eos_ids, graphs=False)
    for T, C in ((20_000, 2048), (20_000, 4096), (60_000, 2048)):
        g = group(T)

        def whole():
            fastgen.forward_text(model, arena, *fastgen.Chunks(g, (PREFIX_AT, []), "cuda", T).next())

        def chunked(beside):
            chunks, n = fastgen.Chunks(g, (PREFIX_AT, []), "cuda", C), 0
            while not chunks.finished:
                if beside:
                    mixer.step_with(live, chunks.next())
                else:
                    fastgen.forward_text(model, arena, *chunks.next())
                n += 1
            return n

        n = chunked(False)
        steps = lambda: [decoder.step(live) for _ in range(n)]  # noqa: E731
        row = {"chunks": n}
        for name, fn in (("whole", whole), ("chunks_alone", lambda: chunked(False)),
                         ("chunks_with_steps", lambda: chunked(True)), ("graph_steps_alone", steps)):
            row[name] = timed(fn, 2)
        out[f"prefix {T}, chunks of {C}"] = row
        print(T, C, row, file=sys.stderr, flush=True)
    g = group(20_000)
    chunks = fastgen.Chunks(g, (PREFIX_AT, []), "cuda", 2048)
    for _ in range(5):
        part = chunks.next()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        mixer.step_with(live, part)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    out["mixed_step_kernels (6th chunk of 2048, 20k prefix)"] = {
        "kernels": sum(e.count for e in events), "total_ms": round(sum(e.device_time_total for e in events) / 1e3, 2),
        "top": [[e.key[:90], e.count, round(e.device_time_total / 1e3, 3)] for e in events[:16]]}
json.dump(out, sys.stdout, indent=1)
print()
