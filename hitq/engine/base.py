"""The small interface every model back-end implements. No torch here.

A worker turns a job into chat `messages` (hitq.benchmark), asks the engine to count
their tokens while fitting the table into the budget, then `prepare`s the final messages
(CPU: tokenise, load and resize images) and `generate`s a batch of prepared requests.

Messages use the transformers chat layout: a list of `{"role", "content"}` where content
is a list of `{"type": "text", "text": str}` and `{"type": "image", "image": path}` parts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ImageLimits:
    """Pixel bounds an image is resized into (qwen-vl-utils `smart_resize`)."""

    min_pixels: int = 4 * 32 * 32  # h*w after resizing, lower bound
    max_pixels: int = 1280 * 32 * 32  # h*w after resizing, upper bound (~1.3 Mpx, 1280 visual tokens)


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings shared by all jobs of a run. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass(frozen=True)
class TokenCount:
    """What `count_tokens` measured for one set of messages."""

    tokens: int  # prompt tokens, chat template and image placeholders included
    image_pixels_before: int | None = None  # original w*h of the (first) image
    image_pixels_after: int | None = None  # w*h after resizing to the limits
    image_tokens: int | None = None  # visual tokens the image expands to


@dataclass
class Prepared:
    """One request ready for the device: built on the CPU by `Engine.prepare`."""

    key: Any  # the caller's id for this request (the job id)
    inputs: Any  # engine-specific tensors or token ids
    count: TokenCount
    max_new_tokens: int
    stop_at_answer: bool = False  # stop decoding once a `[Final Answer]:` line is complete
    prefix_key: str | None = None  # requests with equal keys share a prompt prefix


@dataclass
class Output:
    """The result of one request."""

    key: Any
    text: str  # decoded new tokens, special tokens skipped
    output_tokens: int
    seconds: float  # device time attributed to this request (synchronised clock)
    extra: dict = field(default_factory=dict)


class Engine(Protocol):
    """A model back-end. Engines raise hitq.errors.EngineOOM when the device runs out of
    memory for a whole batch; the worker's OOM ladder splits and shrinks from there."""

    name: str

    def count_tokens(self, messages: list[dict], images: ImageLimits) -> TokenCount: ...

    def prepare(
        self,
        key: Any,
        messages: list[dict],
        images: ImageLimits,
        max_new_tokens: int,
        stop_at_answer: bool = False,
        prefix_key: str | None = None,
    ) -> Prepared: ...

    def generate(self, batch: list[Prepared], settings: GenerationSettings) -> list[Output]: ...

    def describe(self) -> dict: ...  # device name, library versions, dtype, attention kernel
