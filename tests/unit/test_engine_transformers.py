"""TransformersEngine on the tiny model (CPU): exact counts, batching, OOM injection, errors, images."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from hitq.engine import load_engine  # noqa: E402
from hitq.engine import images as images_mod  # noqa: E402
from hitq.engine.base import GenerationSettings, ImageLimits, Prepared, TokenCount  # noqa: E402
from hitq.engine.images import image_size, load_image  # noqa: E402
from hitq.engine.qwen3vl import OOMInjector, TransformersEngine, _StepWatch, answer_complete, plan_batches  # noqa: E402
from hitq.engine.tiny import build_tiny_model  # noqa: E402
from hitq.errors import BadInput, EngineError, EngineOOM, MissingInput, ModelDirError, UsageError  # noqa: E402

LIMITS = ImageLimits()
GREEDY = GenerationSettings()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HITQ_INJECT_OOM", raising=False)


@pytest.fixture(scope="module")
def tiny_dir(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return TransformersEngine(tiny_dir)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    d = tmp_path_factory.mktemp("pictures")
    Image.new("RGB", (300, 200), (200, 10, 10)).save(d / "small.png")
    Image.new("RGBA", (1000, 800), (20, 100, 10, 128)).save(d / "rgba.png")
    Image.new("L", (64, 640), 128).save(d / "tall.jpg")
    return d


def user(text, *image_paths, system=True):
    content = [{"type": "image", "image": str(p)} for p in image_paths] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    if system:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": "You are a table expert."}]})
    return messages


def test_load_engine_factory_builds_the_transformers_engine(tiny_dir):
    engine = load_engine("transformers", str(tiny_dir), device="cpu", load_weights=False)
    assert isinstance(engine, TransformersEngine) and engine.model is None


@pytest.mark.parametrize(
    "make",
    [
        lambda d: user("Hello world"),
        lambda d: user("Describe this image.", d / "small.png"),
        lambda d: user("Describe.", d / "rgba.png", system=False),
        lambda d: user("Compare the two.", d / "small.png", d / "tall.jpg"),
        lambda d: user("A table:\n" + "<tr><td>1,234.5</td></tr>\n" * 500),
    ],
    ids=["text", "image", "rgba", "two-images", "long"],
)
def test_count_equals_prepared_input_ids(engine, pictures, make):
    messages = make(pictures)
    count = engine.count_tokens(messages, LIMITS)
    prepared = engine.prepare("k", messages, LIMITS, max_new_tokens=4)
    assert count == prepared.count
    assert count.tokens == prepared.inputs["input_ids"].shape[1]
    if "pixel_values" in prepared.inputs:
        grid = prepared.inputs["image_grid_thw"]
        assert count.image_tokens == int(grid.prod(dim=1).sum()) // 4 == int((prepared.inputs["input_ids"] == engine.image_token_id).sum())


def test_count_respects_image_limits(engine, pictures):
    messages = user("Describe.", pictures / "rgba.png")
    small = engine.count_tokens(messages, ImageLimits(min_pixels=4 * 32 * 32, max_pixels=64 * 32 * 32))
    large = engine.count_tokens(messages, ImageLimits(min_pixels=4 * 32 * 32, max_pixels=16777216))
    assert small.image_pixels_before == large.image_pixels_before == 800_000
    assert small.image_pixels_after <= 64 * 32 * 32 and small.image_tokens <= 64
    assert large.image_pixels_after == 992 * 800 and large.image_tokens == 775
    assert large.tokens - small.tokens == large.image_tokens - small.image_tokens


def _batch(engine, pictures):
    specs = [
        (user("Hello world"), 5),
        (user("Describe this image.", pictures / "small.png"), 12),
        (user("What is the total? Answer as [Final Answer]: X"), 8),
        (user("Compare.", pictures / "small.png", pictures / "tall.jpg"), 3),
    ]
    return [engine.prepare(i, m, LIMITS, n) for i, (m, n) in enumerate(specs)]


def test_greedy_is_deterministic_and_batch_equals_one_at_a_time(engine, pictures):
    batch = _batch(engine, pictures)
    first = engine.generate(batch, GREEDY)
    second = engine.generate(batch, GREEDY)
    singles = [engine.generate([p], GREEDY)[0] for p in batch]
    assert [o.key for o in first] == [0, 1, 2, 3]
    assert [o.text for o in first] == [o.text for o in second] == [o.text for o in singles]
    assert [o.output_tokens for o in first] == [o.output_tokens for o in singles]
    for p, o in zip(batch, first):
        assert 1 <= o.output_tokens <= p.max_new_tokens
        assert o.extra["input_tokens"] == p.count.tokens
        assert o.extra["prefill_s"] > 0 and o.extra["decode_s"] >= 0 and o.seconds > 0
        assert "<|" not in o.text  # special tokens skipped


def test_sampling_is_reproducible_with_a_seed(engine, pictures):
    batch = _batch(engine, pictures)[:2]
    settings = GenerationSettings(temperature=1.0, top_p=0.95, top_k=50, seed=7)
    assert [o.text for o in engine.generate(batch, settings)] == [o.text for o in engine.generate(batch, settings)]


def test_answer_complete_rule():
    assert not answer_complete("thinking")
    assert not answer_complete("[Final Answer]: 42")
    assert not answer_complete("[Final Answer]:\n\n")
    assert answer_complete("so\n[Final Answer]: 42\n")
    assert answer_complete("[Final Answer]:\n42\n")
    assert not answer_complete("[Final Answer]: 1\n[Final Answer]: 4")  # the last marker counts


def test_step_watch_stops_a_row_at_its_answer_line_or_limit(engine):
    tok = engine.tokenizer
    ids = tok("Let me see.\n[Final Answer]: 42\nThen more text follows here")["input_ids"]
    stop_after = len(tok("Let me see.\n[Final Answer]: 42\n")["input_ids"])
    prompt = [5, 6, 7]
    rows = torch.tensor([prompt + ids, prompt + ids])
    watch = _StepWatch(tok, len(prompt), limits=[100, 4], answer_rows=[True, False], device=torch.device("cpu"))
    for n in range(1, len(ids) + 1):
        done = watch(rows[:, : len(prompt) + n])
    assert done.tolist() == [True, True]
    assert watch.stopped_at == [stop_after, 4]
    assert watch.first_step_at is not None


def test_stop_at_answer_generation_stays_within_limits(engine, pictures):
    p = engine.prepare("a", user("Answer: [Final Answer]: 1"), LIMITS, max_new_tokens=6, stop_at_answer=True)
    [out] = engine.generate([p], GREEDY)
    assert out.output_tokens <= 6


@pytest.mark.parametrize(
    "spec, fires",
    [
        ("always", [True, True]),
        ("batch>1", [True, False]),
        ("batch>=2", [True, False]),
        ("tokens>60", [True, False]),
        ("longest>=200", [False, False]),
        ("keys=1,9", [True, False]),
        ("keys=0", [True, True]),
        ("calls=1", [True, False]),
        ("batch>5; keys=0", [True, True]),
    ],
)
def test_oom_injector_spec(spec, fires):
    def prepared(key, tokens):
        return Prepared(key, None, TokenCount(tokens), 4)

    injector = OOMInjector(spec)
    batches = [[prepared(0, 40), prepared(1, 40)], [prepared(0, 40)]]
    assert [injector.fires(b) is not None for b in batches] == fires


def test_bad_oom_spec_is_rejected():
    with pytest.raises(EngineError, match="HITQ_INJECT_OOM"):
        OOMInjector("batch=3")


def test_injected_oom_raises_engine_oom(tiny_dir, pictures, monkeypatch):
    monkeypatch.setenv("HITQ_INJECT_OOM", "batch>1")
    engine = TransformersEngine(tiny_dir)
    batch = _batch(engine, pictures)
    with pytest.raises(EngineOOM, match="batch of 4") as info:
        engine.generate(batch, GREEDY)
    assert info.value.kind == "oom"
    assert engine.generate(batch[:1], GREEDY)[0].output_tokens > 0  # the ladder's next rung works
    calls = TransformersEngine(tiny_dir, inject_oom=lambda b: any(p.key == 2 for p in b))
    with pytest.raises(EngineOOM):
        calls.generate(batch[2:3], GREEDY)


def test_real_out_of_memory_errors_become_engine_oom(tiny_dir, pictures, monkeypatch):
    engine = TransformersEngine(tiny_dir)

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(engine.model, "generate", boom)
    with pytest.raises(EngineOOM, match="prompt tokens"):
        engine.generate(_batch(engine, pictures)[:2], GREEDY)


def test_model_dir_errors(tmp_path):
    with pytest.raises(ModelDirError, match="not found"):
        TransformersEngine(tmp_path / "absent")
    with pytest.raises(ModelDirError, match="no config.json"):
        TransformersEngine(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="cannot load") as info:
        TransformersEngine(tmp_path)
    assert "\n" not in str(info.value)


def test_engine_options_from_the_command_line(tiny_dir):
    engine = load_engine("transformers", str(tiny_dir), load_weights="false", dtype="bf16", image_cap_pixels="1000")
    assert engine.model is None and engine.dtype == torch.bfloat16 and engine.image_cap_pixels == 1000
    with pytest.raises(UsageError, match="unknown transformers engine option.*batch_size"):
        load_engine("transformers", str(tiny_dir), batch_size="4")
    assert load_engine("transformers", str(tiny_dir), load_weights="false", prefill_chunk="2048").prefill_chunk == 2048
    assert load_engine("transformers", str(tiny_dir), load_weights="false", prefill_chunk="0").prefill_chunk is None
    with pytest.raises(UsageError, match="prefill_chunk must be a number of tokens, got 'lots'"):
        load_engine("transformers", str(tiny_dir), load_weights="false", prefill_chunk="lots")
    assert load_engine("transformers", str(tiny_dir), load_weights="false", decode_share="0").decode_share == 0
    with pytest.raises(UsageError, match="decode_share must be a number from 0 to 10, got 'fast'"):
        load_engine("transformers", str(tiny_dir), load_weights="false", decode_share="fast")


def test_count_only_engine_cannot_generate(tiny_dir, pictures):
    engine = TransformersEngine(tiny_dir, load_weights=False)
    p = engine.prepare(1, user("Hi"), LIMITS, 4)
    assert p.count.tokens == engine.count_tokens(user("Hi"), LIMITS).tokens
    with pytest.raises(EngineError, match="without weights"):
        engine.generate([p], GREEDY)


def test_describe(engine):
    info = engine.describe()
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["attention"] == "sdpa"
    assert info["torch"] == torch.__version__ and info["weights"] == "loaded" and info["parameters"] > 0


def test_plan_batches_groups_similar_lengths():
    reqs = [Prepared(k, None, TokenCount(t), 10) for k, t in enumerate([100, 5000, 120, 4800, 90])]
    batches = plan_batches(reqs, max_batch_size=2)
    assert [[p.key for p in b] for b in batches] == [[1, 3], [2, 0], [4]]
    assert [[p.key for p in b] for b in plan_batches(reqs, 8, max_batch_tokens=10_000)] == [[1], [3, 2], [0, 4]]


# -- images ---------------------------------------------------------------------------------


def test_missing_and_unreadable_images(tmp_path, engine):
    with pytest.raises(MissingInput):
        load_image(tmp_path / "absent.png", LIMITS)
    with pytest.raises(MissingInput):
        engine.count_tokens(user("x", tmp_path / "absent.png"), LIMITS)
    lfs = tmp_path / "lfs.png"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(MissingInput, match="LFS"):
        image_size(lfs)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG not really")
    with pytest.raises(BadInput):
        load_image(junk, LIMITS)
    thin = tmp_path / "thin.png"
    Image.new("RGB", (5000, 10)).save(thin)
    with pytest.raises(BadInput, match="aspect ratio"):
        load_image(thin, LIMITS)


def test_images_over_the_hard_cap_are_refused(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (2000, 1000)).save(path)
    with pytest.raises(BadInput, match="too large"):
        load_image(path, LIMITS, cap_pixels=1_000_000)


def test_bomb_guard_is_raised_only_while_opening(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500_000)  # PIL would refuse 2 Mpx (> 2x the limit)
    path = tmp_path / "big.png"
    Image.new("RGB", (2000, 1000), (1, 2, 3)).save(path)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    img, before, after = load_image(path, ImageLimits(max_pixels=256 * 32 * 32))
    assert (before, after) == (2_000_000, img.size[0] * img.size[1]) and after <= 256 * 32 * 32
    assert Image.MAX_IMAGE_PIXELS == 500_000


def test_huge_jpeg_decodes_at_reduced_size_to_the_same_size(tmp_path, monkeypatch):
    path = tmp_path / "scan.jpg"
    Image.new("RGB", (3000, 2000), (250, 250, 250)).save(path, quality=80)
    normal, _, _ = load_image(path, LIMITS)
    monkeypatch.setattr(images_mod, "HUGE_PIXELS", 1_000_000)
    fast, before, after = load_image(path, LIMITS)
    assert fast.size == normal.size and fast.mode == "RGB"
    assert before == 6_000_000 and after == fast.size[0] * fast.size[1] <= LIMITS.max_pixels


def test_the_fast_paths_description_names_its_decode_kernel_and_pacing(tiny_dir, monkeypatch):
    """describe()["generation"] as a CUDA engine words it (the CPU model stands in: its decode
    kernel is PyTorch's, as on a card without Triton)."""
    engine = TransformersEngine(tiny_dir, fast=True)
    monkeypatch.setattr(engine, "device", torch.device("cuda"))
    words = engine._generation()
    assert "decode attention torch memory-efficient" in words and "CUDA-graph decode" in words
    assert "paced at 1 s of decode per s of prefill while other workers share the run" in words
