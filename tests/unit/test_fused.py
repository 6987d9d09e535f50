"""hitq.engine.fused on the CPU: the uncompiled kernels are transformers' Qwen3-VL arithmetic bit
for bit, the fused projections are views (no copy), and a failing compiler falls back once."""
import logging
import types

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen  # noqa: E402

from hitq.engine import fused  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_rope_and_mlp_match_transformers_modules_exactly(dtype):
    torch.manual_seed(0)
    R, T, Hq, Hkv, D, H = 3, 5, 8, 2, 16, 64
    norm = qwen.Qwen3VLTextRMSNorm(H, eps=1e-6).to(dtype)
    q_norm, k_norm = qwen.Qwen3VLTextRMSNorm(D, eps=1e-6).to(dtype), qwen.Qwen3VLTextRMSNorm(D, eps=1e-6).to(dtype)
    for m in (norm, q_norm, k_norm):
        m.weight.data = (torch.rand_like(m.weight) + 0.5).to(dtype)
    h, delta = torch.randn(R, T, H, dtype=dtype), torch.randn(R, T, H, dtype=dtype)
    assert torch.equal(fused.rms_norm(h, norm.weight, 1e-6), norm(h))
    summed, normed = fused.add_rms_norm(h, delta, norm.weight, 1e-6)
    assert torch.equal(summed, h + delta) and torch.equal(normed, norm(h + delta))

    qkv = torch.randn(R, T, (Hq + 2 * Hkv) * D, dtype=dtype)
    angles = torch.rand(R, T, D // 2) * 50
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    q, k, v = fused.qk_norm_rope(qkv, q_norm.weight, k_norm.weight, 1e-6, cos, sin, Hq, Hkv)
    q_ref, k_ref, v_ref = qkv.view(R, T, Hq + 2 * Hkv, D).split([Hq, Hkv, Hkv], 2)
    want_q, want_k = qwen.apply_rotary_pos_emb(q_norm(q_ref).transpose(1, 2), k_norm(k_ref).transpose(1, 2), cos, sin)
    assert torch.equal(q, want_q.transpose(1, 2)) and torch.equal(k, want_k.transpose(1, 2)) and torch.equal(v, v_ref)

    gate_up = torch.randn(R, T, 2 * H, dtype=dtype)
    act = qwen.ACT2FN["silu"]
    assert torch.equal(fused.silu_mul(gate_up), act(gate_up[..., :H]) * gate_up[..., H:])


def test_projections_are_one_tensor_whose_views_the_modules_keep():
    lin = [torch.nn.Linear(8, n, bias=False) for n in (8, 4, 4)]
    before = [m.weight.detach().clone() for m in lin]
    weight = fused._concat(lin)
    assert weight.shape == (16, 8) and torch.equal(weight, torch.cat(before))
    assert all(m.weight.data_ptr() == weight[at:].data_ptr() for m, at in zip(lin, (0, 8, 12)))
    assert all(torch.equal(m.weight, b) for m, b in zip(lin, before))
    with pytest.raises(ValueError, match="bias-free"):
        fused._concat([torch.nn.Linear(8, 8)])


def test_a_failing_compiler_warns_once_and_the_eager_kernel_runs(monkeypatch, caplog):
    """A CUDA tensor's first call compiles; if that fails the run goes on uncompiled (one
    warning), but an out-of-memory error inside a compiled kernel is the run's, not the compiler's."""
    cuda_like = types.SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(fused.Kernel, "enabled", True)

    def broken(*args):
        raise RuntimeError("no working C compiler\nlong trace")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    kernel = fused.Kernel(lambda x, n: ("eager", n))
    with caplog.at_level(logging.WARNING, logger="hitq.engine"):
        assert kernel(cuda_like, 1) == ("eager", 1) and kernel(cuda_like, 2) == ("eager", 2)
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile failed (RuntimeError: no working C compiler); the fast path runs uncompiled kernels"]
    assert fused.Kernel.enabled is False

    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(fused.Kernel, "enabled", True)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: oom)
    with pytest.raises(torch.OutOfMemoryError):
        fused.Kernel(lambda x: "eager")(cuda_like)
    assert fused.Kernel.enabled is True
