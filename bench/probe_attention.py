"""Which attention kernels this GPU + torch offer for hitq's fast path (run on the GPU machine).

1. Decode over a ragged KV arena: aten._flash_attention_forward in varlen mode with seqused_k
   (each row reads only its own tokens, rows anywhere in one flat buffer) against the matmul
   attention over padded slots; correctness, time, and CUDA-graph capture.
2. Causal prefill attention (GQA 32/8 heads, head_dim 128) per sdpa backend, TFLOP/s.

    python bench/probe_attention.py > bench/probe-attention-<gpu>.json
"""
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hitq.engine.measure import clock

dev, dt = "cuda", torch.bfloat16
out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
       "schema": str(torch.ops.aten._flash_attention_forward.default._schema)}


# 1. decode: B rows, lengths ~ U(2k, 30k), arena of their exact sizes vs padded slots
torch.manual_seed(0)
B, Hq, Hkv, D = 32, 32, 8, 128
lengths = torch.randint(2000, 30000, (B,))
starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]]) + 1000 * torch.arange(B)  # gaps between regions
total = int(starts[-1] + lengths[-1]) + 64
arena_k = torch.randn(total, Hkv, D, device=dev, dtype=dt)
arena_v = torch.randn(total, Hkv, D, device=dev, dtype=dt)
q = torch.randn(B, Hq, D, device=dev, dtype=dt)
cu_q = torch.arange(B + 1, device=dev, dtype=torch.int32)
cu_k = torch.cat([starts, starts[-1:] + lengths[-1:]]).to(dev, torch.int32)
used = lengths.to(dev, torch.int32)
scale = D ** -0.5
cap = int(lengths.max())


def varlen():
    return torch.ops.aten._flash_attention_forward(q, arena_k, arena_v, cu_q, cu_k, 1, cap, 0.0, False, False,
                                                   scale=scale, seqused_k=used)[0]


res = {}
try:
    got = varlen()
    worst = 0.0
    for b in range(B):
        s, n = int(starts[b]), int(lengths[b])
        k = arena_k[s:s + n].transpose(0, 1)  # (Hkv, n, D)
        v = arena_v[s:s + n].transpose(0, 1)
        qq = q[b].view(Hkv, Hq // Hkv, D).float()
        p = torch.softmax(qq @ k.float().transpose(-1, -2) * scale, -1)
        want = (p @ v.float()).reshape(Hq, D)
        worst = max(worst, float((got[b].float() - want).abs().max()))
    res["max_abs_error"] = worst
    res["ms"] = clock(varlen, 20) * 1e3
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        varlen()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        o = varlen()
    used.add_(1)
    g.replay()
    torch.cuda.synchronize()
    res["graph_ok"] = bool(torch.isfinite(o).all())
    res["graph_ms"] = clock(g.replay, 20) * 1e3
except Exception as e:  # noqa: BLE001
    res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
kv_bytes = int(lengths.sum()) * Hkv * D * 2 * 2
res["gbytes_read"] = kv_bytes / 1e9
if "ms" in res:
    res["tb_per_s"] = kv_bytes / res["ms"] * 1e3 / 1e12
# padded slots, matmul attention (the current decode)
slots_k = torch.randn(B, Hkv, cap, D, device=dev, dtype=dt)
slots_v = torch.randn(B, Hkv, cap, D, device=dev, dtype=dt)
mask = (torch.arange(cap, device=dev)[None] < lengths.to(dev)[:, None])[:, None, None]


def padded():
    sc = torch.matmul(q.view(B, Hkv, Hq // Hkv, D), slots_k.transpose(-1, -2)) * scale
    sc = sc.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(sc, -1, dtype=torch.float32).to(dt), slots_v)


res["padded_matmul_ms"] = clock(padded, 20) * 1e3
out["decode"] = res
del slots_k, slots_v, arena_k, arena_v

# 2. prefill attention per backend
pre = {}
for L in (16384, 65536):
    qq = torch.randn(1, Hq, L, D, device=dev, dtype=dt)
    kk = torch.randn(1, Hkv, L, D, device=dev, dtype=dt)
    vv = torch.randn(1, Hkv, L, D, device=dev, dtype=dt)
    fl = 4 * Hq * D * L * L / 2
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                t = clock(lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True), n=3)
            pre[f"{name}_gqa_{L}"] = round(fl / t / 1e12, 1)
        except Exception as e:  # noqa: BLE001
            pre[f"{name}_gqa_{L}"] = f"{type(e).__name__}: {str(e)[:120]}"
        try:
            kr, vr = kk.repeat_interleave(4, 1), vv.repeat_interleave(4, 1)
            with sdpa_kernel([be]):
                t = clock(lambda: F.scaled_dot_product_attention(qq, kr, vr, is_causal=True), n=3)
            pre[f"{name}_repeat_{L}"] = round(fl / t / 1e12, 1)
            del kr, vr
        except Exception as e:  # noqa: BLE001
            pre[f"{name}_repeat_{L}"] = f"{type(e).__name__}: {str(e)[:120]}"
    # flash varlen causal (what a chunked prefill over the arena would use)
    try:
        cq = torch.tensor([0, L], device=dev, dtype=torch.int32)
        qv, kv_, vv_ = qq[0].transpose(0, 1).contiguous(), kk[0].transpose(0, 1).contiguous(), vv[0].transpose(0, 1).contiguous()
        t = clock(lambda: torch.ops.aten._flash_attention_forward(qv, kv_, vv_, cq, cq, L, L, 0.0, True, False, scale=scale), n=3)
        pre[f"flash_varlen_causal_{L}"] = round(fl / t / 1e12, 1)
    except Exception as e:  # noqa: BLE001
        pre[f"flash_varlen_causal_{L}"] = f"{type(e).__name__}: {str(e)[:120]}"
a = torch.randn(16384, 4096, device=dev, dtype=dt)
w = torch.randn(12288, 4096, device=dev, dtype=dt)
pre["matmul_16k_x_4096_x_12288"] = round(2 * 16384 * 4096 * 12288 / clock(lambda: a @ w.T, 20) / 1e12, 1)
out["prefill_tflops"] = pre
json.dump(out, sys.stdout, indent=1)
print()

# 3. with --model DIR: the 8B text forward (random weights) per backend priority, TFLOP/s
if len(sys.argv) > 2 and sys.argv[1] == "--model":
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(sys.argv[2])
    with torch.device(dev):
        model = AutoModelForImageTextToText.from_config(config, dtype=dt, attn_implementation="sdpa").eval()
    n_lin = sum(p.numel() for p in model.model.language_model.layers.parameters())
    whole = {}
    for L in (16384, 65536):
        ids = torch.randint(0, 150000, (1, L), device=dev)
        fl = 2 * n_lin * L + 2 * 36 * 4096 * L * L
        for name, order in (("default", None), ("cudnn_first", [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                                                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])):
            def fwd():
                with torch.inference_mode():
                    model(input_ids=ids, use_cache=True, logits_to_keep=1)
            try:
                if order:
                    with sdpa_kernel(order, set_priority=True):
                        t = clock(fwd, n=2)
                else:
                    t = clock(fwd, n=2)
                whole[f"{name}_{L}"] = {"s": round(t, 3), "tflops": round(fl / t / 1e12, 1)}
            except Exception as e:  # noqa: BLE001
                whole[f"{name}_{L}"] = f"{type(e).__name__}: {str(e)[:160]}"
    out["model_forward"] = whole
    json.dump(out["model_forward"], sys.stdout, indent=1)
    print()
