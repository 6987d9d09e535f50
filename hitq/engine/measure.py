"""Device-side measurement for `hitq bench` and the probes: synchronised clocks, peak memory, the predecessor's
one-query `generate` call, the fast path's logit check and library versions. The bench glue
(hitq/workers/bench.py) calls these so that only hitq/engine imports torch and transformers."""
from __future__ import annotations

import importlib.metadata

import torch


def sync() -> None:
    """Wait for queued GPU work before a clock is read."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clock(fn, n: int = 5) -> float:
    """Seconds per call of fn, after one warm-up call, the GPU synchronised at both ends (probes)."""
    import time

    fn()
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - start) / n


def release() -> None:
    """Give cached device memory back (between the bench's phases)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None


def predecessor_generate(engine, prepared, n: int) -> int:
    """The predecessor's method for one request: `model.generate` at batch 1, greedy, exactly `n`
    new tokens (min = max). Returns the number of new tokens."""
    inputs = engine.collate([prepared])
    with torch.inference_mode():
        seq = engine.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, temperature=1.0,
                                    top_p=1.0, top_k=50, eos_token_id=engine.eos_ids, pad_token_id=engine.pad_id)
    return seq.shape[1] - inputs["input_ids"].shape[1]


def check_fast_logits(engine, prepared: list) -> dict:
    """First-token logits of the fast path (shared prefix + suffix) against one full forward each."""
    from hitq.engine import fastgen

    rows = [fastgen.Row(p, 1) for p in prepared]
    group = fastgen.make_groups(rows, engine.image_token_id)[0]
    kwarg = fastgen.cache_kwarg(engine.model)
    worst, agree = 0.0, 0
    with torch.inference_mode():
        fast = fastgen.prefill_group(engine.model, group, engine.device, kwarg)[0]
        for r, got in zip(group.rows, fast):
            want = engine.model(**engine.collate([r.prepared]), logits_to_keep=1).logits[:, -1].float()
            got = got.float()
            worst = max(worst, float((got - want).norm() / want.norm()))
            agree += int(got.argmax() == want.argmax())
    return {"rows": len(group.rows), "shared_prefix": group.split, "max_rel_error": worst, "argmax_agree": agree}


def versions(engine) -> dict:
    """GPU name and library versions for the bench JSON."""
    import transformers

    try:
        flash = importlib.metadata.version("flash_attn")
    except importlib.metadata.PackageNotFoundError:
        flash = None
    return {"gpu": torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__, "flash_attn": flash}


def tokenizer(model_dir: str):
    """The model's own tokenizer (reference answer lengths are counted with it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
