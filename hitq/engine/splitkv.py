"""The decode step's attention as one Triton kernel: split-KV ("flash-decoding") over fastgen's slots.

fastgen cuts every segment of the KV arena that a decode step reads into pieces ("slots"); a
slot's queries are the G query heads of each row reading it (up to fastgen.ROWS_PER_READ rows),
and the slots' partial results are merged into rows by log-sum-exp. Here one program handles one
slot and one KV head: it reads the slot's K/V once, in blocks, with an online softmax, and writes
each query's output and log-sum-exp where the merge reads them. PyTorch's memory-efficient
varlen kernel did the same call at ~1.7 TB/s of K/V on an H100 (bench/probe-decode-h100.json);
bench/probe_decode_kernel.py times the two against each other.

HITQ_DECODE_KERNEL=efficient turns it off (PyTorch's kernel, as fastgen._efficient).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only or Windows builds of torch come without Triton
    triton = None

CONFIG = (128, 4, 2)  # K/V positions a block, warps, pipeline stages: the best of bench/probe-decode-kernel-h100.json
LOG2E = 1.4426950408889634


def usable(device: torch.device, head_dim: int, max_q: int) -> bool:
    """Whether this kernel serves decode attention on `device`: Triton present, CUDA, a
    power-of-two head size (tl.arange), and not turned off by HITQ_DECODE_KERNEL=efficient."""
    return (triton is not None and device.type == "cuda" and head_dim >= 16 and head_dim & (head_dim - 1) == 0
            and max_q <= 128 and os.environ.get("HITQ_DECODE_KERNEL", "triton") != "efficient")


def attend(q, k, v, cu_q, starts, used, max_q: int, scale: float, config: tuple = CONFIG):
    """q (queries, Hkv, D); k, v (positions, Hkv, D); slot s owns queries cu_q[s]..cu_q[s+1] (at
    most max_q) and reads K/V[starts[s] : starts[s] + used[s]] (int32). Returns (out like q,
    lse (queries, Hkv) float32, natural log): fastgen._efficient's result."""
    block_n, warps, stages = config
    S, Hkv, D = used.shape[0], k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    _slot_attention[(S, Hkv)](q, k, v, out, lse, cu_q, starts, used, scale * LOG2E,
                              q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1), lse.stride(0),
                              D=D, BLOCK_M=max(16, triton.next_power_of_2(max_q)), BLOCK_N=block_n,
                              num_warps=warps, num_stages=stages)
    return out, lse


if triton is not None:

    @triton.jit
    def _slot_attention(Q, K, V, Out, Lse, cu_q, starts, used, scale_log2,
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
                at = (start + j + cols)[:, None] * stride_kn + h * stride_kh + dims[None, :]
                k = tl.load(K + at, mask=inside[:, None], other=0.0)
                score = tl.dot(q, tl.trans(k)) * scale_log2  # (BLOCK_M, BLOCK_N), log2 units
                score = tl.where(inside[None, :], score, float("-inf"))
                new_top = tl.maximum(top, tl.max(score, 1))
                p = tl.exp2(score - new_top[:, None])
                alpha = tl.exp2(top - new_top)
                total = total * alpha + tl.sum(p, 1)
                v = tl.load(V + at, mask=inside[:, None], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                top = new_top
            out = acc / total[:, None]
            tl.store(Out + (q0 + rows)[:, None] * stride_om + h * stride_oh + dims[None, :], out.to(Out.dtype.element_ty),
                     mask=live[:, None])
            tl.store(Lse + (q0 + rows) * stride_lm + h, (top + tl.log2(total)) / 1.4426950408889634, mask=live)
