"""Exact token counts against the real Qwen3-VL-8B-Instruct processor (no weights): the reference
numbers of shared/models/qwen3-vl-8b-instruct-noweights/README.md."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from hitq.engine.base import ImageLimits  # noqa: E402
from hitq.engine.qwen3vl import TransformersEngine  # noqa: E402
from hitq.errors import ModelDirError  # noqa: E402

# ../shared next to the repo; HITQ_TEST_SHARED points elsewhere (a copy on a GPU machine)
SHARED = Path(os.environ.get("HITQ_TEST_SHARED") or Path(__file__).resolve().parents[2].parent / "shared").resolve()
MODEL_DIR = SHARED / "models" / "qwen3-vl-8b-instruct-noweights"
RHB = SHARED / "realhitbench"
PROCESSOR_LIMITS = ImageLimits(min_pixels=65536, max_pixels=16777216)  # preprocessor_config.json's

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "config.json").is_file(), reason="no shared no-weights model dir")


@pytest.fixture(scope="module")
def engine():
    return TransformersEngine(MODEL_DIR, load_weights=False)


def text_turn(text):
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def test_tokenizer_reference_ids(engine):
    assert engine.tokenizer("Hello world")["input_ids"] == [9707, 1879]
    assert len(engine.tokenizer) == 151669
    # <|im_start|>user\n ... <|im_end|>\n<|im_start|>assistant\n around the 2 text tokens
    assert engine.count_tokens(text_turn("Hello world"), PROCESSOR_LIMITS).tokens == 2 + 8


def test_image_turn_is_789_input_ids(engine, tmp_path):
    path = tmp_path / "picture.png"
    Image.new("RGB", (1000, 800), (30, 60, 90)).save(path)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "Describe this image."}]}]
    count = engine.count_tokens(messages, PROCESSOR_LIMITS)
    assert (count.tokens, count.image_tokens, count.image_pixels_after) == (789, 775, 992 * 800)
    prepared = engine.prepare(0, messages, PROCESSOR_LIMITS, max_new_tokens=1)
    assert prepared.inputs["input_ids"].shape[1] == 789
    assert prepared.inputs["image_grid_thw"].tolist() == [[1, 50, 62]]
    assert tuple(prepared.inputs["pixel_values"].shape) == (3100, 1536)


def test_long_html_table_counts_333746(engine, tmp_path):
    subprocess.run([str(RHB / "unpack"), str(tmp_path), "html"], check=True, capture_output=True)
    with open(tmp_path / "html" / "economy-table14_swap.html", encoding="utf-8", errors="ignore") as f:
        table = f.read()
    assert engine.count_tokens(text_turn(table), PROCESSOR_LIMITS).tokens == 333_746


def test_loading_weights_from_the_noweights_dir_says_what_to_do():
    with pytest.raises(ModelDirError, match="no weights in .*random_weights=True"):
        TransformersEngine(MODEL_DIR)
