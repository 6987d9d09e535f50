"""The tiny Qwen3-VL directory: deterministic, quick to build, loads through the real Auto classes."""
from __future__ import annotations

import hashlib
import json
import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from hitq.engine.tiny import ADDED_TOKENS, build_tiny_model  # noqa: E402

FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.json",
    "model.safetensors",
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return transformers.AutoProcessor.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="module")
def model(tiny_dir):
    return transformers.AutoModelForImageTextToText.from_pretrained(str(tiny_dir)).eval()


def _digests(d):
    return {name: hashlib.sha256((d / name).read_bytes()).hexdigest() for name in FILES}


def test_build_is_fast_and_deterministic(tiny_dir, tmp_path):
    start = time.perf_counter()
    first = build_tiny_model(tmp_path / "first", teach_steps=3)
    assert time.perf_counter() - start < 10
    again = build_tiny_model(tmp_path / "again", teach_steps=3)
    assert _digests(again) == _digests(first)
    other_seed = build_tiny_model(tmp_path / "seed1", seed=1, teach_steps=3)
    assert _digests(other_seed)["model.safetensors"] != _digests(first)["model.safetensors"]
    assert _digests(other_seed)["tokenizer.json"] == _digests(tiny_dir)["tokenizer.json"]


def test_config_ids_match_the_tokenizer(tiny_dir, processor):
    config = json.loads((tiny_dir / "config.json").read_text())
    tok = processor.tokenizer
    assert 2000 <= len(tok) <= 4000
    assert config["text_config"]["vocab_size"] == len(tok)
    ids = {t: tok.convert_tokens_to_ids(t) for t, _ in ADDED_TOKENS}
    assert config["image_token_id"] == ids["<|image_pad|>"] == processor.image_token_id
    assert config["video_token_id"] == ids["<|video_pad|>"]
    assert config["vision_start_token_id"] == ids["<|vision_start|>"]
    assert config["vision_end_token_id"] == ids["<|vision_end|>"]
    assert config["text_config"]["eos_token_id"] == ids["<|im_end|>"] == tok.eos_token_id
    assert tok.pad_token_id == ids["<|endoftext|>"]
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    # the added tokens follow the BPE vocabulary in Qwen's order
    assert list(ids.values()) == list(range(len(tok) - len(ADDED_TOKENS), len(tok)))


def test_tokenizer_round_trips_and_keeps_special_tokens_whole(processor):
    tok = processor.tokenizer
    for text in ["Hello world", "[Final Answer]: 12.5, Yes", "<td>1,234</td>\n| a | b |", "你好，世界 ü"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>"
    ids = tok(text)["input_ids"]
    assert ids.count(processor.image_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi"


def test_chat_template_is_qwen3_vl(processor):
    messages = [{"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "Hi"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"


def test_generates_from_text_and_image_on_cpu(processor, model):
    tok = processor.tokenizer
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}], tokenize=False, add_generation_prompt=True
    )
    start = time.perf_counter()
    inputs = processor(text=[text], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    image_text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "Describe."}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = processor(text=[image_text], images=[Image.new("RGB", (320, 256), (10, 200, 30))], return_tensors="pt")
    assert (inputs["input_ids"] == processor.image_token_id).sum() == 320 * 256 // 32**2
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert isinstance(tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True), str)
    assert time.perf_counter() - start < 5
