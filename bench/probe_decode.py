"""What one decode step and one prefix prefill cost, compiled kernels against eager ones (run on the GPU machine).

Builds the 8B architecture with random bf16 weights, fills a KV arena with random keys and
values, and times fastgen's CUDA-graph decode step (rows=64 decode positions, as `hitq work`
runs) for a few live-row shapes, and forward_text over one text prefix, once with the fused
kernels compiled (hitq.engine.fused) and once with HITQ_COMPILE off. Then the eager kernels of one
compiled step, by CUDA time (torch.profiler), to show what a step is made of.

    python bench/probe_decode.py MODEL_DIR > bench/probe-decode-<gpu>.json
"""
import json
import sys
import time

import torch

from hitq.engine import fastgen, fused
from hitq.engine.measure import clock
from hitq.engine.qwen3vl import TransformersEngine

engine = TransformersEngine(sys.argv[1], device="cuda", random_weights=True)
model = engine.model
POSITIONS, ROWS = 200_000, 64
out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": ROWS}
arena = fastgen.Arena(model, POSITIONS)
for t in arena.k + arena.v:
    t.normal_()
SHAPES = {"1 row, 2k context": [2_000], "8 rows, 20k each": [20_000] * 8, "64 rows, 2k each": [2_000] * 64,
          "16 rows, 8k each (4 groups share 6k)": [8_000] * 16}


def live_rows(lengths):
    """decode position -> (token, rope position, ((prefix start, len), (own start, len)), forced)."""
    live, at = {}, 0
    for i, n in enumerate(lengths):
        live[i] = (100 + i, n, ((at, n - 40), (at + n - 40, 39)), True)
        at += n + 64
    return live


def decode_ms(shape):
    decoder = fastgen.Decoder(model, arena, ROWS, POSITIONS, engine.eos_ids, graphs=True)
    live = live_rows(SHAPES[shape])
    return 1e3 * clock(lambda: decoder.step(live), 20)


def prefill_s(T):
    ids = torch.randint(1000, model.config.text_config.vocab_size - 1000, (1, T), device="cuda")
    where = fastgen.Where(torch.arange(T, device="cuda")[None], [[(0, 0), (0, T)]], first=True)
    return clock(lambda: fastgen.forward_text(model, arena, ids, torch.arange(T, device="cuda")[None], where), 3)


with torch.inference_mode():
    for compiled in (True, False):
        fused.Kernel.enabled = compiled
        label = "compiled" if compiled else "eager"
        t0 = time.perf_counter()
        out[f"decode_ms_{label}"] = {shape: round(decode_ms(shape), 2) for shape in SHAPES}
        out[f"prefill_s_{label}"] = {T: round(prefill_s(T), 4) for T in (4096, 16384, 65536)}
        out[f"first_call_s_{label}"] = round(time.perf_counter() - t0, 1)
        print(label, out[f"decode_ms_{label}"], out[f"prefill_s_{label}"], file=sys.stderr, flush=True)
    fused.Kernel.enabled = True
    # one layer's decode attention for "8 rows, 20k each": flash (kBlockM 128 for 4 query rows) vs
    # the memory-efficient kernel (smaller query blocks), same slots
    host = [[pre, (own, n + 1)] for _, _, (pre, (own, n)), _ in live_rows(SHAPES["8 rows, 20k each"]).values()]
    host += [[(arena.scratch, 1), (arena.scratch, 0)]] * (ROWS - len(host))
    starts, used, _, _, size = fastgen.slots(host, ROWS * fastgen.Decoder.SLOTS_PER_ROW, arena.scratch)
    as_int = {"dtype": torch.int32, "device": "cuda"}
    starts, used = torch.tensor(starts, **as_int), torch.tensor(used, **as_int)
    S, G, Hkv, D = len(used), 4, 8, 128
    q = torch.randn(S * G, Hkv, D, device="cuda", dtype=torch.bfloat16)
    cu_q = torch.arange(0, S * G + 1, G, **as_int)
    k, v = arena.k[0], arena.v[0]
    flash = lambda: fastgen._flash(q, k, v, cu_q, starts, used, G, POSITIONS, False, D**-0.5)  # noqa: E731
    out["one_layer_attention_us"] = {"flash": round(1e6 * clock(flash, 50), 1), "piece_size": size}
    try:
        eff = lambda: torch.ops.aten._efficient_attention_forward(  # noqa: E731
            q[None], k[None], v[None], None, cu_q, starts, G, POSITIONS, 0.0, 0, True, scale=D**-0.5, seqlen_k=used)
        out["one_layer_attention_us"]["efficient"] = round(1e6 * clock(eff, 50), 1)
        a, b = flash()[0].float(), eff()[0][0].float()
        out["one_layer_attention_us"]["efficient_vs_flash_max_abs"] = float((a - b).abs().max())
    except Exception as e:  # noqa: BLE001
        out["one_layer_attention_us"]["efficient"] = f"{type(e).__name__}: {str(e)[:200]}"
    decoder = fastgen.Decoder(model, arena, ROWS, POSITIONS, engine.eos_ids, graphs=False)
    live = live_rows(SHAPES["8 rows, 20k each"])
    decoder.step(live)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        decoder.step(live)
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    out["eager_step_kernels"] = {"kernels": sum(e.count for e in events),
                                 "total_ms": round(sum(e.device_time_total for e in events) / 1e3, 2),
                                 "top": [[e.key[:90], e.count, round(e.device_time_total / 1e3, 3)] for e in events[:14]]}
json.dump(out, sys.stdout, indent=1)
print()
