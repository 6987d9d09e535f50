"""TransformersEngine on a CUDA device: bf16 tiny model, honest timings, the 8B architecture with
random weights (shared no-weights dir), and real OOMs becoming EngineOOM."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from hitq.engine.base import GenerationSettings, ImageLimits  # noqa: E402
from hitq.engine.qwen3vl import TransformersEngine  # noqa: E402
from hitq.engine.tiny import build_tiny_model  # noqa: E402
from hitq.errors import EngineOOM  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# ../shared next to the repo; HITQ_TEST_SHARED points elsewhere (a copy on a GPU machine)
SHARED = Path(os.environ.get("HITQ_TEST_SHARED") or Path(__file__).resolve().parents[2].parent / "shared").resolve()
NOWEIGHTS = SHARED / "models" / "qwen3-vl-8b-instruct-noweights"
LIMITS = ImageLimits()
GREEDY = GenerationSettings()


def messages(text, image=None):
    content = ([{"type": "image", "image": str(image)}] if image else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "picture.png"
    Image.new("RGB", (1000, 800), (30, 60, 90)).save(path)
    return path


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    return TransformersEngine(build_tiny_model(tmp_path_factory.mktemp("tiny") / "m"), device="cuda")


def test_tiny_model_on_cuda_in_bf16(tiny_engine, picture):
    assert tiny_engine.describe()["dtype"] == "bfloat16"
    assert tiny_engine.describe()["device_name"] == torch.cuda.get_device_name()
    batch = [tiny_engine.prepare(i, messages(t, img), LIMITS, n) for i, (t, img, n) in
             enumerate([("Hello", None, 8), ("Describe.", picture, 16), ("Hi", None, 4)])]
    outs = tiny_engine.generate(batch, GREEDY)
    assert [o.key for o in outs] == [0, 1, 2]
    assert all(1 <= o.output_tokens <= p.max_new_tokens for p, o in zip(batch, outs))
    assert outs[0].extra["max_memory_reserved"] > 0 and outs[0].extra["prefill_s"] > 0


def test_real_oom_becomes_engine_oom_and_memory_is_freed(tiny_engine, monkeypatch):
    p = tiny_engine.prepare(0, messages("Hello"), LIMITS, max_new_tokens=4)
    before = torch.cuda.memory_allocated()
    real_generate = tiny_engine.model.generate

    def greedy_generate(**kwargs):
        held = torch.empty(2**30, dtype=torch.uint8, device="cuda")  # 1 GiB the OOM must not leak
        return torch.empty(2**50, dtype=torch.uint8, device="cuda") + held[0]

    monkeypatch.setattr(tiny_engine.model, "generate", greedy_generate)
    monkeypatch.setattr(tiny_engine, "fast", False)  # the OOM is raised inside model.generate
    with pytest.raises(EngineOOM, match="out of memory on cuda"):
        tiny_engine.generate([p], GREEDY)
    assert torch.cuda.memory_allocated() <= before + 2**20
    monkeypatch.setattr(tiny_engine.model, "generate", real_generate)
    assert tiny_engine.generate([p], GREEDY)[0].output_tokens > 0
    monkeypatch.setattr(tiny_engine.model.model.language_model.embed_tokens, "forward", lambda ids: torch.empty(2**50, device="cuda"))
    monkeypatch.setattr(tiny_engine, "fast", True)  # the fast path's OOM becomes EngineOOM too
    with pytest.raises(EngineOOM, match="out of memory on cuda"):
        tiny_engine.generate([p], GREEDY)


@pytest.mark.slow
@pytest.mark.skipif(not (NOWEIGHTS / "config.json").is_file(), reason="no shared no-weights model dir")
def test_8b_random_weights_generate(picture):
    engine = TransformersEngine(NOWEIGHTS, device="cuda", random_weights=True)
    assert engine.describe()["parameters"] == 8_767_123_696
    p = engine.prepare(0, messages("Describe this image.", picture), ImageLimits(65536, 16777216), 5)
    assert p.count.tokens == 789
    [out] = engine.generate([p], GREEDY)
    assert out.output_tokens <= 5 and out.extra["input_tokens"] == 789


def test_fast_path_on_cuda_equals_generate_and_its_cuda_graph_equals_eager_steps(tmp_path_factory, picture):
    """float32: the fast path (2 decode rows, admitted as others stop) gives the tokens of
    one-at-a-time `model.generate`. bf16: flash-attention varlen decode replayed as a CUDA graph
    gives the tokens of the same steps run eagerly."""
    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny32") / "m")
    table = "<table>" + "".join(f"<tr><td>r{i}</td><td>{i * 7}</td></tr>" for i in range(60)) + "</table>"
    reqs = [(i, messages(f"{table}\nQuestion: {q}"), 6 + 9 * i, "t") for i, q in enumerate(["What is r3?", "Sum?", "Why?"])]
    reqs += [(10, messages("Describe.", picture), 20, None), (11, messages("Hi"), 7, None)]

    def texts(outputs):
        return [(o.text, o.output_tokens) for o in outputs]

    fp32 = TransformersEngine(model_dir, device="cuda", dtype="float32", fast=True, max_batch_rows=2)
    batch = [fp32.prepare(k, m, LIMITS, n, False, key) for k, m, n, key in reqs]
    fast = fp32.generate(batch, GREEDY)
    assert max(o.extra["most_live"] for o in fast) == 2
    fp32.prefill_chunk = 64  # prefixes admitted beside live rows go in 64-token chunks, each with a decode step
    chunked = fp32.generate(batch, GREEDY)
    fp32.fast = False
    assert texts(fast) == texts(chunked) == texts([fp32.generate([p], GREEDY)[0] for p in batch])

    bf16 = TransformersEngine(model_dir, device="cuda", fast=True, max_batch_rows=2)
    batch = [bf16.prepare(k, m, LIMITS, n, False, key) for k, m, n, key in reqs]
    graphs = bf16.generate(batch, GREEDY)
    bf16.cuda_graphs = False
    assert texts(graphs) == texts(bf16.generate(batch, GREEDY))
    assert bf16.describe()["generation"].startswith("fastgen")


def test_flash_attention_over_the_arena_equals_the_reference_path(monkeypatch):
    """Decode attention over equal pieces merged into rows (the Triton kernel, then PyTorch's
    memory-efficient one) and prefix + causal own region (suffix, flash) against sdpa row by row
    in float32, on segments scattered through one arena."""
    from hitq.engine import fastgen, splitkv

    torch.manual_seed(0)
    N, Hkv, G, D = 60_000, 8, 4, 128
    k = torch.randn(N, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(N, Hkv, D, device="cuda", dtype=torch.bfloat16)
    scale = D**-0.5
    # rows 0-9 share a 20k prefix (one read for 8 of them, one for 2), the last row is idle: no pairs
    host = [[(0, 20_000), (30_000 + 1000 * i, 700 - 60 * i)] for i in range(10)]
    host += [[(40_000, 3_000), (45_000, 1)], [(N - 1, 1), (N - 1, 1)]]
    starts, used, cu_pairs, pairs, size = fastgen.slots(host + [[]], 64, scratch=N - 1)
    as_int = {"dtype": torch.int32, "device": "cuda"}
    where = fastgen.Where(None, host + [host[-1]], (torch.tensor(starts, **as_int), torch.tensor(used, **as_int),
                                                    torch.tensor(cu_pairs, **as_int), torch.tensor(pairs, device="cuda"), 20_000))
    q = torch.randn(len(host) + 1, Hkv * G, 1, D, device="cuda", dtype=torch.bfloat16)
    want = fastgen._attend_reference(q[:-1].float(), k.float(), v.float(), fastgen.Where(None, host), scale)
    assert splitkv.usable(q.device, D, G * fastgen.ROWS_PER_READ) and not splitkv.usable(q.device, 96, G * fastgen.ROWS_PER_READ)
    for kernel in ("triton", "efficient"):
        monkeypatch.setenv("HITQ_DECODE_KERNEL", kernel)
        got = fastgen._attend_decode(q, k, v, where, scale).float()
        assert (got[:-1] - want).abs().max() < 2e-2 and not got[-1].any(), kernel
    assert not splitkv.usable(q.device, D, G * fastgen.ROWS_PER_READ)  # HITQ_DECODE_KERNEL=efficient

    for T in (1, 9):  # a question's suffix can be a single token
        where = fastgen.Where(None, [[(0, 20_000), (30_000, T)], [(40_000, 3_000), (45_000, T)]])
        q = torch.randn(2, Hkv * G, T, D, device="cuda", dtype=torch.bfloat16)
        got = fastgen._attend_suffix(q, k, v, where, scale).float()
        want = fastgen._attend_reference(q.float(), k.float(), v.float(), where, scale)
        assert (got - want).abs().max() < 2e-2


@torch.inference_mode()
def test_a_prefill_chunk_and_a_decode_step_in_one_forward_equal_each_run_alone(tiny_engine):
    """bf16 on the flash path: a 700-token prefix prefilled in 256-token chunks, each chunk in one
    forward with a decode step of another row (forward_parts), gives the logits of the prefix
    prefilled at once, and every step the logits of that step run alone."""
    from types import SimpleNamespace

    from hitq.engine import fastgen

    model = tiny_engine.model
    torch.manual_seed(0)
    n = 700
    ids = torch.randint(100, model.config.text_config.vocab_size, (1, n))
    group = SimpleNamespace(split=n, rows=[SimpleNamespace(prepared=SimpleNamespace(inputs={"input_ids": ids}))])
    arena = fastgen.Arena(model, 8192)
    whole = fastgen.forward_text(model, arena, *fastgen.Chunks(group, (0, []), "cuda", n).next())
    decoder = fastgen.Decoder(model, arena, rows=4, max_k=8192, eos_ids=[0], graphs=False)
    live = {1: (int(ids[0, 5]), n, ((0, n), (2000, 0)), False)}  # decode position 1 reads the prefix at 0

    def step():
        return decoder._part(decoder._load(live))

    def rel(got, want):
        return float((got.float() - want.float()).norm() / want.float().norm())

    [alone] = fastgen.forward_parts(model, arena, [step()])
    chunks, mixed = fastgen.Chunks(group, (4000, []), "cuda", 256), 0
    while not chunks.finished:
        chunk_logits, step_logits = fastgen.forward_parts(model, arena, [chunks.next(), step()])
        assert rel(step_logits[1], alone[1]) < 2e-2
        mixed += 1
    assert mixed == 3 and rel(chunk_logits, whole) < 2e-2


@pytest.mark.parametrize("R,T", [(64, 1), (1, 4099)])  # a decode step, a prefill
def test_compiled_kernels_equal_transformers_arithmetic(R, T):
    """Each fused kernel of the text forward, compiled, against its eager arithmetic in float64
    (bf16 operands: relative error ~1e-3). Compilation must really happen: a silent fallback to
    eager kernels would hide a slower run."""
    from hitq.engine import fastgen, fused

    torch.manual_seed(R + T)
    H, Hq, Hkv, D, I = 4096, 32, 8, 128, 12288
    bf = {"device": "cuda", "dtype": torch.bfloat16}

    def rel(got, want):
        got, want = got.double().cpu(), want.double().cpu()
        return float((got - want).norm() / want.norm())

    def check(kernel, *args):
        got = kernel(*args)
        want = kernel.fn(*[a.double().cpu() if torch.is_tensor(a) and a.is_floating_point() else
                           a.cpu() if torch.is_tensor(a) else a for a in args])
        for g, w in zip(got if isinstance(got, tuple) else [got], want if isinstance(want, tuple) else [want]):
            assert g.shape == w.shape and rel(g, w) < 1e-2
        assert kernel.compiled is not None and fused.Kernel.enabled

    h, delta, w = torch.randn(R, T, H, **bf), torch.randn(R, T, H, **bf), torch.rand(H, **bf) + 0.5
    check(fused.norm, h, w, 1e-6)
    check(fused.add_norm, h, delta, w, 1e-6)
    angles = torch.rand(R, T, D // 2, device="cuda") * 100
    cos, sin = torch.cat([angles.cos()] * 2, -1).bfloat16(), torch.cat([angles.sin()] * 2, -1).bfloat16()
    check(fused.attention_in, torch.randn(R, T, (Hq + 2 * Hkv) * D, **bf), torch.rand(D, **bf) + 0.5,
          torch.rand(D, **bf) + 0.5, 1e-6, cos, sin, Hq, Hkv)
    check(fused.mlp_in, torch.randn(R, T, 2 * I, **bf))
    S = 8 * R
    owner = torch.cat([torch.arange(R + 1), torch.randint(0, R + 1, (S - R - 1,))]).cuda()  # pairs in any order
    check(fastgen._merge_into_rows, torch.randn(S, Hq // Hkv, Hkv, D, **bf), torch.randn(S, Hq // Hkv, Hkv, device="cuda") * 5,
          owner, fastgen.slot_tables(owner, torch.sort(owner, stable=True).indices, R)[1])
