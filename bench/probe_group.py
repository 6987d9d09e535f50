"""What a group's prefill and a decode step cost besides their big kernels (run on the GPU machine).

Builds the 8B architecture with random bf16 weights and a KV arena, then times, for a text
prefix of T tokens shared by R questions of 60 tokens: the prefix alone, the prefix then one
forward per question (fastgen before the one-forward group prefill), and fastgen.prefill_group
(the prefix and every question in one forward); each with the host time until the calls returned.
Then one CUDA-graph decode step: its wall time with the host's work (inputs, token read-back)
against graph replays alone, and its kernels by CUDA time (torch.profiler).

    python bench/probe_group.py MODEL_DIR > bench/probe-group-<gpu>.json
"""
import json
import sys
from types import SimpleNamespace

import torch
from probe_setup import build, live_rows, timed

from hitq.engine import fastgen

POSITIONS, ROWS = 300_000, 64
engine, model, arena, out = build(POSITIONS, ROWS)
vocab = model.config.text_config.vocab_size


def group(T, R):
    prefix = torch.randint(1000, vocab - 1000, (1, T))
    rows = [fastgen.Row(SimpleNamespace(inputs={"input_ids": torch.cat([prefix, torch.randint(1000, vocab - 1000, (1, 60))], 1)}), 1)
            for _ in range(R)]
    g = fastgen.Group(rows, T)
    return g, (200_000, [250_000 + 100 * i for i in range(R)])


def one_forward_per_question(g, regions):
    """fastgen's prefill_group before the group prefill: the prefix, then each suffix alone."""
    prefix, owns = regions
    fastgen.forward_text(model, arena, *fastgen.Chunks(g, regions, "cuda", g.split).next())
    for own, r in zip(owns, g.rows):
        ids = r.prepared.inputs["input_ids"][0]
        suffix = ids[g.split :].to("cuda")[None]
        where = fastgen.Where.rows([((prefix, g.split), (own, 0))], suffix.shape[1], "cuda")
        fastgen.forward_text(model, arena, suffix, torch.arange(g.split, ids.numel(), device="cuda")[None], where)


with torch.inference_mode():
    for T, R in ((4096, 2), (12_000, 2), (12_000, 6)):
        g, regions = group(T, R)
        row = {"prefix_alone": timed(lambda: fastgen.forward_text(model, arena, *fastgen.Chunks(g, regions, "cuda", T).next()), 3),
               "one_forward_per_question": timed(lambda: one_forward_per_question(g, regions), 3),
               "prefill_group": timed(lambda: fastgen.prefill_group(model, g, "cuda", "cache", arena, regions), 3)}
        out[f"prefix {T}, {R} questions of 60"] = row
        print(T, R, row, file=sys.stderr, flush=True)
    decoder = fastgen.Decoder(model, arena, ROWS, POSITIONS, engine.eos_ids, graphs=True)
    for shape, live in (("1 row, 2k", live_rows(1, 2_000)), ("8 rows, 20k each", live_rows(8, 20_000))):
        step = timed(lambda: decoder.step(live), 20)
        replay = timed(lambda: decoder.graph.replay(), 20)
        load = timed(lambda: decoder._load(live), 20)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            decoder.graph.replay()
            torch.cuda.synchronize()
        events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        out[f"decode step, {shape}"] = {
            "step_ms": round(1e3 * step["s"], 2), "replay_ms": round(1e3 * replay["s"], 2), "load_host_ms": round(1e3 * load["host_s"], 2),
            "kernels": sum(e.count for e in events), "kernel_ms": round(sum(e.device_time_total for e in events) / 1e3, 2),
            "top": [[e.key[:90], e.count, round(e.device_time_total / 1e3, 3)] for e in events[:30]]}
        print(shape, out[f"decode step, {shape}"]["step_ms"], out[f"decode step, {shape}"]["replay_ms"], file=sys.stderr, flush=True)
json.dump(out, sys.stdout, indent=1)
print()
