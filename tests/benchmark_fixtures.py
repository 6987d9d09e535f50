"""Shared fixtures for the hitq.benchmark tests: the unpacked RealHiTBench copy and the
Qwen3-VL tokenizer. Import the fixtures you use into the test module (the lead owns conftest.py):

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmark_fixtures import rhb_data  # noqa: F401

Unpacking is cached under pytest's session base temp dir (the `unpack` script is idempotent),
so every module that imports the fixture shares one copy.
"""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
RHB = SHARED / "realhitbench"
TOKENIZER_DIR = SHARED / "models" / "qwen3-vl-8b-instruct-noweights"
PARTS = ("html", "markdown", "latex", "json", "csv", "image")


def _unpack(base: Path) -> Path:
    target = base / "realhitbench"
    if not all((target / p / ".complete").is_file() for p in PARTS):
        subprocess.run([str(RHB / "unpack"), str(target), *PARTS], check=True, capture_output=True)
    return target


@pytest.fixture(scope="session")
def rhb_data(tmp_path_factory) -> Path:
    """The dataset unpacked (all text formats and the image pointers; no xlsx)."""
    return _unpack(tmp_path_factory.getbasetemp())


@functools.lru_cache(maxsize=1)
def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="session")
def qwen_tokenizer():
    return load_tokenizer()


def chat_text(messages: list[dict]) -> str:
    """The rendered chat template text of `messages` (add_generation_prompt=True)."""
    return load_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def count_text_tokens(messages: list[dict]) -> int:
    """Exact prompt tokens of text-only messages with the real Qwen3-VL tokenizer."""
    return len(load_tokenizer()(chat_text(messages), add_special_tokens=False)["input_ids"])
