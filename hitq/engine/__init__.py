"""Model back-ends. The only package that imports torch or transformers, and only lazily."""
from __future__ import annotations

from hitq.engine.base import Engine, GenerationSettings, ImageLimits, Output, Prepared, TokenCount

ENGINES = ("transformers", "fake")

__all__ = ["ENGINES", "Engine", "GenerationSettings", "ImageLimits", "Output", "Prepared", "TokenCount", "load_engine"]


def load_engine(name: str, model_dir: str | None, device: str = "cpu", **options) -> Engine:
    """Build the engine called `name` for `device` ("cpu" or "cuda")."""
    if name == "fake":
        from hitq.engine.fake import FakeEngine

        return FakeEngine(**options)
    if name == "transformers":
        from hitq.engine.qwen3vl import TransformersEngine

        return TransformersEngine(model_dir, device=device, **options)
    from hitq.errors import UsageError

    raise UsageError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}")
