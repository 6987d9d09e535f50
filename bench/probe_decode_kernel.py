"""A split-KV decode attention kernel in Triton against the one fastgen uses (not yet measured on a GPU).

fastgen's decode step (`_attend_decode`) runs every (slot, row) pair through PyTorch's
memory-efficient varlen kernel: each slot is a piece of a segment of the KV arena, its queries
are the G query heads of each row that reads it (G x up to 8 rows), and the pieces are merged
into rows by log-sum-exp. bench/probe-decode-h100.json measured that kernel at 383 us a layer
for 8 rows x 20k positions, ~1.7 TB/s of K/V read on an H100 (3.35 peak): about half of a long
step. This probe holds the same call as a Triton kernel (one program per slot and KV head, an
online softmax over the slot's positions in blocks, out and log-sum-exp in fastgen's layout),
checks it against a plain softmax per slot, and on a GPU times it against `fastgen._efficient` on
decode-step shapes. It is the next candidate for table-first's decode time (bench/README.md).

    python bench/probe_decode_kernel.py                      # GPU: check + timings (JSON on stdout)
    TRITON_INTERPRET=1 python bench/probe_decode_kernel.py   # CPU: the check alone, small shapes
"""
import json
import math
import os

import torch
import triton
import triton.language as tl

BLOCK_M = 32  # queries of one slot at most: G (4) query heads x fastgen.ROWS_PER_READ (8) rows


@triton.jit
def _decode(Q, K, V, Out, Lse, cu_q, starts, used, scale_log2,
            stride_qm, stride_qh, stride_kn, stride_kh, stride_om, stride_oh, stride_lm,
            D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Slot s, KV head h: queries cu_q[s]..cu_q[s+1] attend to K/V[starts[s] : starts[s] + used[s]]."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    q0 = tl.load(cu_q + s)
    n_q = tl.load(cu_q + s + 1) - q0
    if n_q > 0:  # unused slots come last and have no queries: their programs end at once
        start = tl.load(starts + s).to(tl.int64)
        n = tl.load(used + s)
        rows = tl.arange(0, BLOCK_M)
        dims = tl.arange(0, D)
        cols = tl.arange(0, BLOCK_N)
        live = rows < n_q
        q = tl.load(Q + (q0 + rows)[:, None] * stride_qm + h * stride_qh + dims[None, :], mask=live[:, None], other=0.0)
        top = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for j in range(0, n, BLOCK_N):
            inside = j + cols < n
            at = start + j + cols
            k = tl.load(K + at[None, :] * stride_kn + h * stride_kh + dims[:, None], mask=inside[None, :], other=0.0)
            score = tl.dot(q, k) * scale_log2  # (BLOCK_M, BLOCK_N), log2 units
            score = tl.where(inside[None, :], score, float("-inf"))
            new_top = tl.maximum(top, tl.max(score, 1))
            p = tl.exp2(score - new_top[:, None])
            alpha = tl.exp2(top - new_top)
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(V + at[:, None] * stride_kn + h * stride_kh + dims[None, :], mask=inside[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            top = new_top
        out = acc / total[:, None]
        tl.store(Out + (q0 + rows)[:, None] * stride_om + h * stride_oh + dims[None, :], out.to(Out.dtype.element_ty), mask=live[:, None])
        tl.store(Lse + (q0 + rows) * stride_lm + h, (top + tl.log2(total)) / 1.4426950408889634, mask=live)


def decode_attention(q, k, v, cu_q, starts, used, scale, block_n=64, warps=4, stages=2):
    """q (queries, Hkv, D); k, v (positions, Hkv, D); cu_q (S + 1,), starts (S,), used (S,) int32.
    Returns (out (queries, Hkv, D), lse (queries, Hkv) float32, natural log), like fastgen._efficient."""
    S, Hkv, D = used.shape[0], k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    _decode[(S, Hkv)](q, k, v, out, lse, cu_q, starts, used, scale * 1.4426950408889634,
                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1), lse.stride(0),
                      D=D, BLOCK_M=BLOCK_M, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return out, lse


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
    starts, used, cu = starts + [total] * pad, used + [1] * pad, cu + cu[-1:] * pad
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

        result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
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
            for block_n, warps, stages in ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (32, 4, 3)):
                row[f"triton_{block_n}_{warps}w_{stages}s_us"] = timed(lambda: decode_attention(q, k, v, cu, starts, used, scale, block_n, warps, stages))
            best = min(v for key, v in row.items() if key.startswith("triton"))
            row.update(read_mb=read / 1e6, efficient_tb_s=read / row["efficient_us"] / 1e6, triton_best_tb_s=read / best / 1e6)
            result[name] = row
        print(json.dumps(result, indent=1))
