"""Which kernel the fast path's prefill attention gets (run on the GPU machine).

fastgen._attend_first calls causal sdpa (GQA 32/8 heads, head_dim 128) on the new K/V, which
live in the KV arena as (positions, kv_heads, head_dim). sdpa silently falls back to another
backend when one refuses its inputs; this times the arena view as it is and contiguous copies,
with cuDNN first and with each backend alone, and checks cuDNN against flash.

    python bench/probe_prefill.py > bench/probe-prefill-<gpu>.json
"""
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hitq.engine.measure import clock

dev, dt, Hq, Hkv, D = "cuda", torch.bfloat16, 32, 8, 128
PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}


for T in (4096, 16384, 65536):
    arena_k = torch.randn(T + 100, Hkv, D, device=dev, dtype=dt)
    arena_v = torch.randn(T + 100, Hkv, D, device=dev, dtype=dt)
    q_bthd = torch.randn(1, T, Hq, D, device=dev, dtype=dt).transpose(1, 2)  # as the projections leave it
    k_view, v_view = arena_k[50 : 50 + T].transpose(0, 1)[None], arena_v[50 : 50 + T].transpose(0, 1)[None]
    q_c, k_c, v_c = q_bthd.contiguous(), k_view.contiguous(), v_view.contiguous()
    flops = 4 * Hq * D * T * T / 2
    row = {}
    for name, (q, k, v) in {"arena_view": (q_bthd, k_view, v_view), "contiguous": (q_c, k_c, v_c)}.items():
        for label, backends in {"cudnn_first": PRIORITY, "cudnn": [SDPBackend.CUDNN_ATTENTION],
                                "flash": [SDPBackend.FLASH_ATTENTION]}.items():
            try:
                with sdpa_kernel(backends, set_priority=label == "cudnn_first"):
                    t = clock(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
                row[f"{name}_{label}"] = round(flops / t / 1e12, 1)
            except Exception as e:  # noqa: BLE001
                row[f"{name}_{label}"] = f"{type(e).__name__}: {str(e)[:160]}"
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            a = F.scaled_dot_product_attention(q_c, k_c, v_c, is_causal=True, enable_gqa=True)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            b = F.scaled_dot_product_attention(q_c, k_c, v_c, is_causal=True, enable_gqa=True)
        row["cudnn_vs_flash_max_abs"] = float((a.float() - b.float()).abs().max())
    except Exception as e:  # noqa: BLE001
        row["cudnn_vs_flash_max_abs"] = f"{type(e).__name__}: {str(e)[:160]}"
    out[f"T{T}_tflops"] = row
    del arena_k, arena_v, q_bthd, q_c, k_c, v_c
json.dump(out, sys.stdout, indent=1)
print()
