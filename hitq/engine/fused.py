"""The elementwise steps of fastgen's text forward, one kernel each on CUDA (torch.compile), with
transformers' Qwen3-VL arithmetic (RMSNorm in float32, rope, SiLU) on the CPU.

Why: transformers' modules run each step as several kernels (an RMSNorm is six: cast, square,
mean, rsqrt, multiply, weight), so a decode step over a few live rows was ~60 small kernels a
layer, 2,000+ a step, and a long prefill moved ~30 MB a token through memory between them.
Here a layer is: norm, one q/k/v product, norm + rope of q and k, attention, o product,
residual + norm, one gate/up product, SiLU·up, down product, residual + next layer's norm.
The projections run as one matrix product each (`projections`): the modules' weights become
views of one tensor, so this costs no memory and transformers' own forward is unchanged.

HITQ_COMPILE=0 turns compilation off (eager CUDA kernels, the same arithmetic).
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger("hitq.engine")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3VLTextRMSNorm: float32 statistics, rounded to x's dtype before the weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual sum and its norm: (h + delta, rms_norm(h + delta))."""
    h = h + delta
    return h, rms_norm(h, weight, eps)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def qk_norm_rope(qkv: torch.Tensor, q_weight, k_weight, eps: float, cos, sin, heads: int, kv_heads: int):
    """qkv (R, T, (heads + 2 kv_heads) * D) -> q (R, T, heads, D), k and v (R, T, kv_heads, D):
    q and k each through their head norm and the rotary embedding (cos, sin: (R, T, D))."""
    R, T, _ = qkv.shape
    D = q_weight.shape[0]
    q, k, v = qkv.view(R, T, heads + 2 * kv_heads, D).split([heads, kv_heads, kv_heads], 2)
    cos, sin = cos[:, :, None], sin[:, :, None]
    return _rope(rms_norm(q, q_weight, eps), cos, sin), _rope(rms_norm(k, k_weight, eps), cos, sin), v.contiguous()


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of one (…, 2 I) product."""
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


class Kernel:
    """fn compiled for CUDA tensors (dynamic shapes: one compilation serves every prompt length);
    fn itself for the rest, and for good if compiling fails (one warning)."""

    enabled = os.environ.get("HITQ_COMPILE", "1") != "0"

    def __init__(self, fn):
        self.fn, self.compiled = fn, None

    def __call__(self, *args):
        if args[0].is_cuda and Kernel.enabled:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
            try:
                return self.compiled(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - a missing compiler must not stop a run
                log.warning("torch.compile failed (%s: %s); the fast path runs uncompiled kernels",
                            type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                Kernel.enabled = False
        return self.fn(*args)


norm, add_norm, attention_in, mlp_in = Kernel(rms_norm), Kernel(add_rms_norm), Kernel(qk_norm_rope), Kernel(silu_mul)


def projections(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (q|k|v weight, gate|up weight), each one tensor; the modules' own weights become
    views of them (made once per model, no extra memory once the old storage is freed)."""
    lm = model.model.language_model
    if getattr(lm, "_hitq_projections", None) is None:
        fused = []
        with torch.no_grad():
            for layer in lm.layers:
                a, m = layer.self_attn, layer.mlp
                fused.append((_concat([a.q_proj, a.k_proj, a.v_proj]), _concat([m.gate_proj, m.up_proj])))
        lm._hitq_projections = fused
    return lm._hitq_projections


def _concat(linears: list) -> torch.Tensor:
    if any(getattr(lin, "bias", None) is not None for lin in linears):
        raise ValueError("fused projections expect bias-free linear layers")
    weight = torch.cat([lin.weight for lin in linears])
    at = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = weight[at : at + n]
        at += n
    return weight
