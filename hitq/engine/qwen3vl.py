"""The transformers engine for Qwen3-VL: exact token counts, CPU preparation, batched generation.

    engine = TransformersEngine(model_dir, device="cuda")        # bf16, flash-attn or sdpa
    count = engine.count_tokens(messages, limits)                # no vision model, no pixels
    prepared = [engine.prepare(job.id, messages, limits, 512) for job in jobs]   # CPU
    outputs = engine.generate(prepared, GenerationSettings())    # device

`generate` is three steps that a custom decode loop (prefix-KV sharing, faster decoding) can
replace one by one: `collate` (left-pad a batch), `_run` (prefill + decode, timed), and `_finish`
(cut each row at its own limit or EOS, decode text).
"""
from __future__ import annotations

import gc
import importlib.metadata
import importlib.util
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import StoppingCriteria

from hitq.engine.base import GenerationSettings, ImageLimits, Output, Prepared, TokenCount
from hitq.engine.images import HARD_CAP_PIXELS, image_size, load_image, resized_size
from hitq.errors import EngineError, EngineOOM, ModelDirError, UsageError

SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")  # (1, L) tensors, left-padded
ANSWER_MARKER = "[Final Answer]:"
INJECT_OOM_ENV = "HITQ_INJECT_OOM"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def answer_complete(text: str) -> bool:
    """True once the last `[Final Answer]:` is followed by a non-blank line ended by a newline
    (the rule of hitq.benchmark.answer.is_answer_complete, kept here: engine imports no benchmark)."""
    at = text.rfind(ANSWER_MARKER)
    return at >= 0 and "\n" in text[at + len(ANSWER_MARKER) :].lstrip()


def _device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def _number_option(name: str, value: Any, kind: type, most: float, what: str) -> int | float:
    """A number from 0 to `most` from an engine option (the command line gives strings)."""
    try:
        n = kind(value)
    except (TypeError, ValueError):
        n = -1
    if not 0 <= n <= most:
        raise UsageError(f"engine option {name} must be {what}, got {value!r}")
    return n


def _tokens_option(name: str, value: Any) -> int | None:
    """A token count from an engine option (None, 0 or "": off)."""
    return _number_option(name, value or 0, int, float("inf"), "a number of tokens") or None


def _sizes(batch: list[Prepared]) -> str:
    """A batch's size, for out-of-memory messages."""
    tokens = [p.count.tokens for p in batch]
    return f"batch of {len(batch)}, prompt tokens {sum(tokens)} (longest {max(tokens)}), max_new_tokens {max(p.max_new_tokens for p in batch)}"


def _flag(value: Any) -> bool:
    """Engine options may come from the command line as strings ("false", "0", "no")."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(value)


def _resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    value = getattr(torch, names.get(str(dtype), str(dtype)), None)
    if not isinstance(value, torch.dtype):
        raise EngineError(f"unknown dtype {dtype!r}: use bfloat16, float16 or float32")
    return value


def _default_attention(device: torch.device) -> str:
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


class OOMInjector:
    """Raise EngineOOM on chosen batches, so the worker's OOM ladder can be tested on a CPU.

    Spec (the `inject_oom` option or HITQ_INJECT_OOM): clauses separated by ";", any match fires.
        always          every batch
        batch>N         batches of more than N requests (also batch>=N)
        tokens>N        batches whose prompt tokens, summed over requests, exceed N (also >=)
        longest>N       batches whose longest prompt exceeds N tokens (also >=)
        keys=A,B,...    batches holding a request whose str(key) is A, B, ...
        calls=N         the first N calls to generate (then never again)
    A callable `inject_oom(batch) -> bool` can be passed instead of a spec.
    """

    _CLAUSE = re.compile(r"^(batch|tokens|longest)(>=|>)(\d+)$|^keys=(.+)$|^calls=(\d+)$|^always$")

    def __init__(self, spec: str | Callable[[list[Prepared]], bool]):
        self.spec = spec
        self.calls = 0
        if callable(spec):
            self.clauses: list[str] = []
            return
        self.clauses = [c.strip().replace(" ", "") for c in spec.split(";") if c.strip()]
        for clause in self.clauses:
            if not self._CLAUSE.match(clause):
                raise EngineError(f"bad {INJECT_OOM_ENV} clause {clause!r}: see hitq.engine.qwen3vl.OOMInjector")

    def fires(self, batch: list[Prepared]) -> str | None:
        """The clause that matches `batch`, or None."""
        self.calls += 1
        if callable(self.spec):
            return "callable" if self.spec(batch) else None
        sizes = {
            "batch": len(batch),
            "tokens": sum(p.count.tokens for p in batch),
            "longest": max((p.count.tokens for p in batch), default=0),
        }
        for clause in self.clauses:
            m = self._CLAUSE.match(clause)
            assert m is not None
            if clause == "always":
                return clause
            if m.group(1):
                value, limit = sizes[m.group(1)], int(m.group(3))
                if value > limit or (m.group(2) == ">=" and value == limit):
                    return clause
            elif m.group(4) and {str(p.key) for p in batch} & set(m.group(4).split(",")):
                return clause
            elif m.group(5) and self.calls <= int(m.group(5)):
                return clause
        return None


class _StepWatch(StoppingCriteria):
    """A stopping criterion: per-row limits and `[Final Answer]:` stops, plus the prefill clock.

    It is called once after every decoding step (the first call right after prefill), so the
    first call's time splits prefill from decode. Row i is done once it has `limits[i]` new tokens
    or, when `answer_rows[i]`, once its text holds a complete `[Final Answer]:` line.
    """

    def __init__(self, tokenizer, prompt_len: int, limits: list[int], answer_rows: list[bool], device: torch.device):
        self.tokenizer, self.prompt_len, self.limits, self.answer_rows = tokenizer, prompt_len, limits, answer_rows
        self.device = device
        self.done = [False] * len(limits)
        self.stopped_at: list[int | None] = [None] * len(limits)  # new tokens kept when a row stopped
        self.first_step_at: float | None = None
        self.new_ids: list[list[int]] = [[] for _ in limits]

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs) -> torch.Tensor:
        if self.first_step_at is None:
            _device_sync(self.device)
            self.first_step_at = time.perf_counter()
        n_new = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1].tolist() if any(self.answer_rows) else None
        for i, limit in enumerate(self.limits):
            if self.done[i]:
                continue
            if last is not None and self.answer_rows[i]:
                self.new_ids[i].append(last[i])
                piece = self.tokenizer.decode(last[i : i + 1])
                if "\n" in piece and answer_complete(self.tokenizer.decode(self.new_ids[i], skip_special_tokens=True)):
                    self.done[i], self.stopped_at[i] = True, n_new
            if n_new >= limit and not self.done[i]:
                self.done[i], self.stopped_at[i] = True, n_new
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def plan_batches(prepared: list[Prepared], max_batch_size: int, max_batch_tokens: int | None = None) -> list[list[Prepared]]:
    """Group requests of similar prompt length into batches (longest first).

    A batch holds at most `max_batch_size` requests and, when given, at most `max_batch_tokens`
    padded tokens (batch size x (longest prompt + its largest max_new_tokens)).
    """
    batches: list[list[Prepared]] = []
    current: list[Prepared] = []
    for p in sorted(prepared, key=lambda p: p.count.tokens, reverse=True):
        candidate = current + [p]
        padded = len(candidate) * (candidate[0].count.tokens + max(q.max_new_tokens for q in candidate))
        if current and (len(candidate) > max_batch_size or (max_batch_tokens and padded > max_batch_tokens)):
            batches.append(current)
            candidate = [p]
        current = candidate
    if current:
        batches.append(current)
    return batches


class TransformersEngine:
    """Qwen3-VL through transformers' `AutoProcessor` and `AutoModelForImageTextToText`.

    load_weights=False loads only the processor (exact token counts for preflight);
    random_weights=True builds the architecture from config.json with random weights on the
    device (benchmarks with the no-weights 8B directory). inject_oom: see OOMInjector.
    """

    name = "transformers"

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        dtype: Any = None,
        attn: str | None = None,
        load_weights: bool = True,
        random_weights: bool = False,
        inject_oom: str | Callable[[list[Prepared]], bool] | None = None,
        image_cap_pixels: int = HARD_CAP_PIXELS,
        fast: Any = None,
        force_lengths: dict | None = None,
        max_batch_rows: int = 64,
        kv_budget_tokens: int | None = None,
        cuda_graphs: Any = True,
        prefill_chunk: Any = None,
        decode_share: Any = 1.0,
        **unknown: Any,
    ):
        if unknown:
            known = ("dtype, attn, load_weights, random_weights, inject_oom, image_cap_pixels, fast, force_lengths, "
                     "max_batch_rows, kv_budget_tokens, cuda_graphs, prefill_chunk, decode_share")
            raise UsageError(f"unknown transformers engine option(s) {', '.join(sorted(unknown))}: choose from {known}")
        self.model_dir = Path(model_dir) if model_dir else None
        if self.model_dir is None or not self.model_dir.is_dir():
            raise ModelDirError(f"model directory not found: {model_dir}")
        if not (self.model_dir / "config.json").is_file():
            raise ModelDirError(f"not a model directory (no config.json): {self.model_dir}")
        self.device = torch.device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.attn = attn or _default_attention(self.device)
        self.image_cap_pixels = int(image_cap_pixels)
        spec = inject_oom if inject_oom is not None else os.environ.get(INJECT_OOM_ENV) or None
        self.oom_injector = OOMInjector(spec) if spec else None
        self.weights = "random" if _flag(random_weights) else "loaded" if _flag(load_weights) else "none"
        # Greedy requests go through hitq.engine.fastgen (shared prefixes, continuous batching,
        # flash-attention decode in a CUDA graph) on CUDA unless fast=false; elsewhere (CPU tests)
        # through model.generate unless fast=true. See bench/README.md for what it was measured at.
        self.fast = _flag(fast) if fast is not None else self.device.type == "cuda"
        # Benchmarks only: request key -> exact number of new tokens (EOS and answer stops ignored).
        self.force_lengths = {str(k): int(v) for k, v in (force_lengths or {}).items()}
        self.max_batch_rows = int(max_batch_rows)
        self.kv_budget_tokens = int(kv_budget_tokens) if kv_budget_tokens is not None else None
        self.cuda_graphs = _flag(cuda_graphs)  # fast path on CUDA: decode steps replayed as CUDA graphs
        # Fast path: prefill text prefixes this many tokens at a time, each chunk in one forward with a
        # decode step (fastgen.run's chunk); off by default: slower on an H100 (bench/README.md).
        self.prefill_chunk = _tokens_option("prefill_chunk", prefill_chunk)
        # Fast path: decode seconds per prefill second while a long answer is live (fastgen.run's pacing).
        self.decode_share = _number_option("decode_share", decode_share, float, 10, "a number from 0 to 10")

        from transformers import AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(str(self.model_dir))
        except Exception as e:  # noqa: BLE001 - any loader failure means an unusable directory
            raise ModelDirError(f"cannot load the processor from {self.model_dir}: {_one_line(e)}") from e
        self.tokenizer = self.processor.tokenizer
        ip = self.processor.image_processor
        self.merge_size = int(ip.merge_size)
        self.factor = int(ip.patch_size) * self.merge_size  # resized sides are multiples of this
        self.image_token_id = int(self.processor.image_token_id)
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.model = self._load_model() if self.weights != "none" else None

    # -- loading ----------------------------------------------------------------------------

    def _eos_ids(self) -> list[int]:
        from transformers import GenerationConfig

        ids: list[int] = []
        try:
            eos = GenerationConfig.from_pretrained(str(self.model_dir)).eos_token_id
            ids = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
        except OSError:  # no generation_config.json
            pass
        for tok_id in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id):
            if tok_id is not None and tok_id not in ids:
                ids.append(tok_id)
        return ids

    def _load_model(self):
        from transformers import AutoConfig, AutoModelForImageTextToText

        try:
            if self.weights == "random":
                config = AutoConfig.from_pretrained(str(self.model_dir))
                config._attn_implementation = self.attn
                with self.device:
                    model = AutoModelForImageTextToText.from_config(config, dtype=self.dtype, attn_implementation=self.attn)
            elif not any(self.model_dir.glob("*.safetensors")) and not any(self.model_dir.glob("*.bin")):
                raise ModelDirError(
                    f"no weights in {self.model_dir} (*.safetensors): use a full model directory, "
                    "load_weights=False to count tokens, or random_weights=True for benchmarks"
                )
            else:
                model = AutoModelForImageTextToText.from_pretrained(
                    str(self.model_dir), dtype=self.dtype, attn_implementation=self.attn
                ).to(self.device)
        except ModelDirError:
            raise
        except Exception as e:  # noqa: BLE001
            if _is_oom(e):
                raise EngineOOM(f"out of memory loading {self.model_dir} on {self.device}: {_one_line(e)}") from None
            raise ModelDirError(f"cannot load the model from {self.model_dir}: {_one_line(e)}") from e
        return model.eval()

    # -- counting and preparing (CPU) -------------------------------------------------------

    def _template(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @staticmethod
    def _image_paths(messages: list[dict]) -> list[str]:
        """Image parts in the order the chat template emits `<|image_pad|>` (user and tool turns)."""
        paths = []
        for message in messages:
            if message.get("role") not in ("user", "tool") or isinstance(message.get("content"), str):
                continue
            for part in message.get("content") or []:
                if part.get("type") == "image" or "image" in part or "image_url" in part:
                    path = str(part.get("image") or part.get("image_url"))
                    paths.append(path[len("file://") :] if path.startswith("file://") else path)
        return paths

    def _count(self, n_text_ids: int, n_pads: int, sizes: list[tuple[int, int]], limits: ImageLimits) -> TokenCount:
        if n_pads != len(sizes):
            raise EngineError(f"the chat template emitted {n_pads} image placeholders for {len(sizes)} images")
        resized = [resized_size(w, h, limits, self.factor) for w, h in sizes]
        image_tokens = [w * h // (self.factor * self.factor) for w, h in resized]
        return TokenCount(
            tokens=n_text_ids + sum(image_tokens) - len(image_tokens),
            image_pixels_before=sizes[0][0] * sizes[0][1] if sizes else None,
            image_pixels_after=resized[0][0] * resized[0][1] if resized else None,
            image_tokens=sum(image_tokens) if sizes else None,
        )

    def count_tokens(self, messages: list[dict], images: ImageLimits) -> TokenCount:
        """Exact prompt tokens of the chat-templated `messages`, images expanded, no pixels decoded.

        image_tokens is the total over all images; the pixel counts are those of the first image.
        """
        ids = self.tokenizer(self._template(messages), verbose=False)["input_ids"]  # no "longer than max" warning
        sizes = [image_size(p, self.image_cap_pixels) for p in self._image_paths(messages)]
        return self._count(len(ids), ids.count(self.image_token_id), sizes, images)

    def prepare(
        self,
        key: Any,
        messages: list[dict],
        images: ImageLimits,
        max_new_tokens: int,
        stop_at_answer: bool = False,
        prefix_key: str | None = None,
    ) -> Prepared:
        """Template, tokenise and load the images of one request on the CPU (unpadded tensors)."""
        text = self._template(messages)
        loaded = [load_image(p, images, self.factor, self.image_cap_pixels) for p in self._image_paths(messages)]
        pil = [img for img, _, _ in loaded]
        # Images are already resized into `images`: the processor must not resize them again
        # (its own defaults, 65536..16777216 px, differ from the job's limits).
        inputs = self.processor(text=[text], images=pil or None, do_resize=False, return_tensors="pt")
        inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        n_ids = inputs["input_ids"].shape[1]
        grid_tokens = [int(t.prod()) // self.merge_size**2 for t in inputs.get("image_grid_thw", [])]
        if grid_tokens != [w * h // self.factor**2 for w, h in (img.size for img in pil)]:
            raise EngineError(f"the processor resized the images again: {grid_tokens} visual tokens")
        count = TokenCount(
            tokens=n_ids,
            image_pixels_before=loaded[0][1] if loaded else None,
            image_pixels_after=loaded[0][2] if loaded else None,
            image_tokens=sum(grid_tokens) if loaded else None,
        )
        return Prepared(key, inputs, count, max_new_tokens, stop_at_answer, prefix_key)

    # -- generation (device) ----------------------------------------------------------------

    def collate(self, batch: list[Prepared]) -> dict[str, torch.Tensor]:
        """Left-pad the sequence tensors of `batch`, concatenate the image tensors, move to device."""
        longest = max(p.inputs["input_ids"].shape[1] for p in batch)
        out: dict[str, torch.Tensor] = {}
        for key in batch[0].inputs:
            tensors = [p.inputs[key] for p in batch if key in p.inputs]
            if key in SEQ_KEYS:
                pad = self.pad_id if key == "input_ids" else 0
                tensors = [torch.nn.functional.pad(t, (longest - t.shape[1], 0), value=pad) for t in tensors]
            value = torch.cat(tensors, dim=0)
            if value.is_floating_point():
                value = value.to(self.dtype)
            out[key] = value.to(self.device, non_blocking=True)
        for key in ("pixel_values", "image_grid_thw"):  # requests without images may come first
            tensors = [p.inputs[key] for p in batch if key in p.inputs]
            if key not in out and tensors:
                value = torch.cat(tensors, dim=0)
                out[key] = (value.to(self.dtype) if value.is_floating_point() else value).to(self.device)
        return out

    def _sampling(self, settings: GenerationSettings) -> dict:
        if settings.temperature <= 0:
            # transformers' global defaults: no "flags ignored" warning, and greedy ignores them anyway
            return {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50}
        return {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}

    def _run(self, inputs: dict, watch: _StepWatch, max_new: int, settings: GenerationSettings) -> tuple[torch.Tensor, float, float]:
        """Prefill + decode with `model.generate`: (sequences, prefill_s, decode_s)."""
        from transformers import StoppingCriteriaList

        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        _device_sync(self.device)
        start = time.perf_counter()
        with torch.inference_mode():
            sequences = self.model.generate(
                **inputs,
                max_new_tokens=max_new,
                eos_token_id=self.eos_ids,
                pad_token_id=self.pad_id,
                stopping_criteria=StoppingCriteriaList([watch]),
                **self._sampling(settings),
            )
        _device_sync(self.device)
        end = time.perf_counter()
        first = watch.first_step_at or end
        return sequences, first - start, end - first

    def _finish(self, batch: list[Prepared], new_tokens: torch.Tensor, watch: _StepWatch) -> list[tuple[str, int]]:
        """Cut each row at its own stop (limit, answer line) or first EOS; decode its text."""
        results = []
        for i, row in enumerate(new_tokens.tolist()):
            keep = row[: watch.stopped_at[i] or batch[i].max_new_tokens]
            eos = next((j for j, t in enumerate(keep) if t in self.eos_ids), None)
            if eos is not None:
                keep = keep[: eos + 1]  # the EOS was generated: it counts, but is not text
            results.append((self.tokenizer.decode(keep, skip_special_tokens=True), len(keep)))
        return results

    def generate(self, batch: list[Prepared], settings: GenerationSettings) -> list[Output]:
        """Generate a batch (left-padded) and return one Output per request, in batch order.

        Each request stops at its own max_new_tokens, at EOS, or (stop_at_answer) after a complete
        `[Final Answer]:` line; the batch runs until all have stopped. Output.seconds is the
        batch's synchronised prefill+decode time divided by the batch size; extra holds the batch
        figures. Raises EngineOOM (memory freed first) when the device runs out of memory.
        """
        if not batch:
            return []
        if self.model is None:
            raise EngineError("this engine was loaded without weights (load_weights=False): it can only count")
        sizes = _sizes(batch)
        if self.oom_injector is not None and (clause := self.oom_injector.fires(batch)):
            raise EngineOOM(f"injected out of memory ({clause}) on {self.device}: {sizes}")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.fast and settings.temperature <= 0:
            return self._generate_fast(batch, sizes)
        # Length-aware sub-batches: similar prompt lengths pad little (a 99k prompt beside a 5k one
        # would pad the short one to 99k).
        done: dict[int, Output] = {}
        for sub in plan_batches(batch, self.max_batch_rows, self.kv_budget_tokens):
            for p, o in zip(sub, self._generate_padded(sub, settings)):
                done[id(p)] = o
        return [done[id(p)] for p in batch]

    def _generate_padded(self, batch: list[Prepared], settings: GenerationSettings) -> list[Output]:
        """One left-padded `model.generate` call for `batch`."""

        def run() -> tuple:
            inputs = self.collate(batch)
            prompt_len = inputs["input_ids"].shape[1]
            watch = _StepWatch(
                self.tokenizer, prompt_len, [p.max_new_tokens for p in batch], [p.stop_at_answer for p in batch], self.device
            )
            sequences, prefill_s, decode_s = self._run(inputs, watch, max(p.max_new_tokens for p in batch), settings)
            return self._finish(batch, sequences[:, prompt_len:].cpu(), watch), prefill_s, decode_s

        rows, prefill_s, decode_s = self._oom_as_engine_oom(run, _sizes(batch))
        reserved = self._peak_reserved()
        seconds = prefill_s + decode_s
        outputs = []
        for p, (text, n_out) in zip(batch, rows):
            extra = {
                "input_tokens": p.count.tokens,
                "prefill_s": prefill_s,
                "decode_s": decode_s,
                "batch_size": len(batch),
                "batch_seconds": seconds,
                "tokens_per_s": n_out / decode_s if decode_s > 0 else None,
                "max_memory_reserved": reserved,
            }
            outputs.append(Output(p.key, text, n_out, seconds / len(batch), extra))
        return outputs

    def _generate_fast(self, batch: list[Prepared], sizes: str) -> list[Output]:
        """Greedy: groups sharing a prefix prefill it once; every row decodes with the others in
        one KV arena sized to the free memory, and a row is admitted as soon as another stops
        (hitq.engine.fastgen, hitq.engine.planner)."""
        from hitq.engine import fastgen, planner

        rows = [fastgen.Row(p, self.force_lengths.get(str(p.key), p.max_new_tokens), str(p.key) in self.force_lengths)
                for p in batch]
        groups = fastgen.make_groups(rows, self.image_token_id)
        images = any("pixel_values" in p.inputs for p in batch)
        budget = planner.device_budget(self.model, self.device, self.max_batch_rows, self.kv_budget_tokens, images)
        stopper = fastgen.Stopper(self.tokenizer, self.eos_ids, answer_complete)
        kwarg = fastgen.cache_kwarg(self.model)
        positions = min(budget.positions(max(g.longest for g in groups)), sum(g.positions for g in groups))
        decode_rows = min(budget.max_rows, len(rows))

        def run() -> dict:
            with torch.inference_mode():
                return fastgen.run(self.model, fastgen.Batch(groups), positions, decode_rows, stopper, self.eos_ids,
                                   self.device, kwarg, lambda: _device_sync(self.device), self.cuda_graphs, self.prefill_chunk,
                                   self.decode_share)

        timing = self._oom_as_engine_oom(run, sizes)
        reserved = self._peak_reserved()
        extra = dict(timing, batch_size=decode_rows, max_memory_reserved=reserved)
        outputs = {id(r.prepared): self._output(r, g, extra, timing["seconds"] / timing["rows"]) for g in groups for r in g.rows}
        return [outputs[id(p)] for p in batch]

    def _oom_as_engine_oom(self, fn: Callable[[], Any], what: str) -> Any:
        """fn(); an out-of-memory error becomes EngineOOM once the memory it held is freed
        (outside the except block, whose traceback would keep the tensors alive)."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                raise
            oom = _one_line(e)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        raise EngineOOM(f"out of memory on {self.device}: {what}: {oom}")

    def can_stream(self, settings: GenerationSettings) -> bool:
        """Whether `stream` serves these settings (greedy on the fast path)."""
        return self.fast and settings.temperature <= 0 and self.oom_injector is None

    def stream(self, feed: Callable[[bool], list[Prepared] | None], done: Callable[[Prepared, Output | EngineOOM], None],
               longest: int, images: bool, stopping: Callable[[], bool] = lambda: False,
               started: Callable[[list[Prepared]], None] = lambda batch: None,
               shared: Callable[[], bool] = lambda: True) -> list[Prepared]:
        """Greedy requests as they come, through one arena for the whole stream: `feed(idle)`
        returns new requests ([] for none yet; with idle=True it waits), None when there are no
        more; `started(requests)` hears of requests as they stop waiting (their prefill begins, or
        they are refused as larger than the arena); `done(request, Output or EngineOOM)` gets each
        request when it stops, the EngineOOM when the request alone is larger than the arena. The
        arena is sized for prompts of up to `longest` tokens (with `images`, transformers' prefill
        workspace). `shared()`: other workers take jobs from the same queue (long answers are
        paced only then: fastgen.run's decode_share). Once `stopping()`, no request is started;
        the stream ends when the live ones stop, and returns the requests it gives back unstarted. An out-of-memory error ends the
        stream as EngineOOM; requests not yet done are then the caller's to retry."""
        from hitq.engine import fastgen, planner

        budget = planner.device_budget(self.model, self.device, self.max_batch_rows, self.kv_budget_tokens, images)
        source = _Stream(self, feed, done, stopping, started, shared)
        stopper = fastgen.Stopper(self.tokenizer, self.eos_ids, answer_complete)

        def run() -> dict:
            with torch.inference_mode():
                return fastgen.run(self.model, source, budget.positions(longest), budget.max_rows, stopper, self.eos_ids,
                                   self.device, fastgen.cache_kwarg(self.model), lambda: _device_sync(self.device), self.cuda_graphs,
                                   self.prefill_chunk, self.decode_share)

        self._oom_as_engine_oom(run, "in a stream")
        return [r.prepared for g in source.given_back for r in g.rows]

    def _peak_reserved(self) -> int | None:
        return torch.cuda.max_memory_reserved(self.device) if self.device.type == "cuda" else None

    def _output(self, r, g, extra: dict, seconds: float) -> Output:
        """A fast-path row as an Output."""
        extra = dict(extra, input_tokens=r.prepared.count.tokens, shared_prefix=g.split if len(g.rows) > 1 else 0,
                     group_prefill_s=r.timing.get("prefill_s"), latency_s=r.timing.get("seconds"), forced_length=r.forced)
        return Output(r.prepared.key, self.tokenizer.decode(r.ids, skip_special_tokens=True), len(r.ids), seconds, extra)

    def _generation(self) -> str:
        from hitq.engine import fastgen

        if not self.fast:
            return "model.generate"
        parts = ["shared prefixes", "continuous batching"]
        parts += ["CUDA-graph decode"] if self.cuda_graphs and self.device.type == "cuda" else []
        parts += [f"decode attention {fastgen.decode_kernel(self.model)}"] if self.model is not None and self.device.type == "cuda" else []
        parts += [f"prefill chunks of {self.prefill_chunk} beside decode steps"] if self.prefill_chunk else []
        parts += [f"long answers paced at {self.decode_share:g} s of decode per s of prefill while other workers share the run"
                  ] if self.decode_share else []
        return f"fastgen ({', '.join(parts)})"

    def describe(self) -> dict:
        """Device name, library versions, dtype and attention kernel, for result rows and reports."""
        import transformers

        flash = importlib.util.find_spec("flash_attn")
        return {
            "engine": self.name,
            "model_dir": str(self.model_dir),
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
            "flash_attn": importlib.metadata.version("flash_attn") if flash is not None else None,
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention": self.attn,
            "weights": self.weights,
            "generation": self._generation(),
            "parameters": sum(p.numel() for p in self.model.parameters()) if self.model is not None else None,
        }


class _Stream:
    """TransformersEngine.stream's source for fastgen.run (see fastgen.Batch)."""

    def __init__(self, engine: TransformersEngine, feed, done, stopping, on_start, shared):
        self.engine, self.feed, self.done, self.stopping, self.on_start, self.shared = engine, feed, done, stopping, on_start, shared
        self.given_back: list = []

    def more(self, idle: bool):
        from hitq.engine import fastgen

        batch = self.feed(idle)
        if batch is None:
            return None
        e = self.engine
        rows = [fastgen.Row(p, e.force_lengths.get(str(p.key), p.max_new_tokens), str(p.key) in e.force_lengths) for p in batch]
        return fastgen.make_groups(rows, e.image_token_id)

    def started(self, group) -> None:
        self.on_start([r.prepared for r in group.rows])

    def finished(self, row, group) -> None:
        extra = {"max_memory_reserved": self.engine._peak_reserved(), "stream": True}
        self.done(row.prepared, self.engine._output(row, group, extra, row.timing["seconds"]))

    def too_large(self, group, positions: int) -> None:
        self.started(group)  # no longer waiting: refused
        for r in group.rows:
            self.done(r.prepared, EngineOOM(f"out of memory on {self.engine.device}: {r.prepared.count.tokens} prompt tokens "
                                            f"+ {r.limit} new need {group.positions} cache positions, {positions} fit"))

    def give_back(self, groups) -> None:
        self.given_back.extend(groups)

