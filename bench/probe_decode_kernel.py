"""The decode step's attention kernel, hitq.engine.splitkv (Triton), against PyTorch's memory-efficient one.

fastgen's decode step (`_attend_decode`) runs every (slot, row) pair in one attention call: each
slot is a piece of a segment of the KV arena, its queries are the G query heads of each row that
reads it (G x up to 8 rows), and the pieces are merged into rows by log-sum-exp. This probe checks
splitkv.attend against a float32 softmax per slot and, on a GPU, times it (several block sizes,
warps and pipeline stages) against `fastgen._efficient` on decode-step shapes; the best
configuration is splitkv.CONFIG.

    python bench/probe_decode_kernel.py                      # GPU: check + timings (JSON on stdout)
    TRITON_INTERPRET=1 python bench/probe_decode_kernel.py   # CPU: the check alone, small shapes
"""
import json
import math
import os

import torch

from hitq.engine import splitkv

BLOCK_M = 32  # queries of one slot at most: G (4) query heads x fastgen.ROWS_PER_READ (8) rows
CONFIGS = ((64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 4, 3), (128, 8, 2), (128, 8, 3), (32, 4, 3), (32, 2, 4))


def decode_attention(q, k, v, cu_q, starts, used, scale, config=splitkv.CONFIG):
    return splitkv.attend(q, k, v, cu_q, starts, used, BLOCK_M, scale, config)


def reference(q, k, v, cu_q, starts, used, scale):
    """The same in float32, one softmax per slot and head."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.full(q.shape[:2], float("-inf"))
    for s in range(used.shape[0]):
        a, b, at, n = int(cu_q[s]), int(cu_q[s + 1]), int(starts[s]), int(used[s])
        if a == b:
            continue
        qs, ks, vs = q[a:b].float(), k[at : at + n].float(), v[at : at + n].float()
        scores = torch.einsum("mhd,nhd->hmn", qs, ks) * scale
        out[a:b] = torch.einsum("hmn,nhd->mhd", scores.softmax(-1), vs)
        lse[a:b] = scores.logsumexp(-1).transpose(0, 1)
    return out, lse


def layout(lengths: list[list[int]], S: int, device, dtype, Hkv=8, D=128, G=4, seed=0):
    """Random K/V for segments of the given lengths (per segment: the rows reading it), cut into
    slots as fastgen.slots does (pieces of one size; unused slots last, no queries)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(n for n, _ in lengths)
    k = torch.randn((total + 1, Hkv, D), generator=g).to(device, dtype)
    v = torch.randn((total + 1, Hkv, D), generator=g).to(device, dtype)
    readers = sum(r for _, r in lengths)
    size = max(1024 if device != "cpu" else 16, -(-sum(n * r for n, r in lengths) // max(1, S - readers)))
    starts, used, cu = [], [], [0]
    at = 0
    for n, r in lengths:
        for i in range(0, n, size):
            starts.append(at + i)
            used.append(min(size, n - i))
            cu.append(cu[-1] + r * G)
        at += n
    pad = S - len(starts)
    assert pad >= 0, "more pieces than slots"
    starts, used, cu = starts + [total] * pad + [0], used + [1] * pad, cu + cu[-1:] * pad  # S + 1 starts, as fastgen.slots
    as_int = {"dtype": torch.int32, "device": device}
    q = torch.randn((cu[-1], Hkv, D), generator=g).to(device, dtype)
    return q, k, v, torch.tensor(cu, **as_int), torch.tensor(starts, **as_int), torch.tensor(used, **as_int)


def check(device, dtype, cases) -> dict:
    worst = {}
    for name, lengths, S in cases:
        q, k, v, cu, starts, used = layout(lengths, S, device, dtype)
        out, lse = decode_attention(q, k, v, cu, starts, used, 1 / math.sqrt(q.shape[-1]))
        want, want_lse = reference(q.cpu(), k.cpu(), v.cpu(), cu.cpu(), starts.cpu(), used.cpu(), 1 / math.sqrt(q.shape[-1]))
        worst[name] = {"max_abs_out": float((out.float().cpu() - want).abs().max()),
                       "max_abs_lse": float((lse.cpu() - want_lse).abs().max())}
    return worst


def timed(fn, n=50) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n * 1000  # us


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        cases = [("2 rows of one prefix, 3 segments", [(70, 2), (33, 1), (5, 1)], 24), ("a slot of 8 rows", [(40, 8)], 16)]
        print(json.dumps({"interpreter": check("cpu", torch.float32, cases)}, indent=1))
    else:
        from hitq.engine import fastgen

        result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": splitkv.triton.__version__}
        cases = [("8 rows, 20k each", [(20_000, 1)] * 8, 512), ("4 groups of 8 rows, 17k prefix each", [(17_000, 8)] * 4, 512),
                 ("30 groups of 2 rows, 15k each", [(15_000, 2)] * 30, 512), ("1 row, 60k", [(60_000, 1)], 512)]
        result["check"] = check("cuda", torch.bfloat16, cases[:2])
        for name, lengths, S in cases:
            q, k, v, cu, starts, used = layout(lengths, S, "cuda", torch.bfloat16)
            scale = 1 / math.sqrt(128)
            read = sum(n for n, _ in lengths) * 8 * 128 * 2 * 2  # K and V bytes of one layer
            # fastgen._efficient's lse indexing: each query's (slot, index within the slot)
            slot = torch.repeat_interleave(torch.arange(S, device="cuda"), (cu[1:] - cu[:-1]).long())
            index = torch.arange(q.shape[0], device="cuda") - cu.long()[slot]
            row = {"efficient_us": timed(lambda: fastgen._efficient(q, k, v, cu, starts, used, BLOCK_M, int(used.max()), scale, (slot, index)))}
            for config in CONFIGS:
                row["triton_%d_%dw_%ds_us" % config] = timed(lambda: decode_attention(q, k, v, cu, starts, used, scale, config))
            best = min(v for key, v in row.items() if key.startswith("triton"))
            row.update(read_mb=read / 1e6, efficient_tb_s=read / row["efficient_us"] / 1e6, triton_best_tb_s=read / best / 1e6)
            result[name] = row
        # the configuration with the least time summed over the cases (splitkv.CONFIG takes it)
        totals = {config: sum(result[name]["triton_%d_%dw_%ds_us" % config] for name, *_ in cases) for config in CONFIGS}
        result["best_config"] = min(totals, key=totals.get)
        result["efficient_total_us"] = sum(result[name]["efficient_us"] for name, *_ in cases)
        result["best_total_us"] = totals[result["best_config"]]
        print(json.dumps(result, indent=1))
