"""Greedy generation for Qwen3-VL that prefills a group's shared prompt prefix once and decodes
many requests in one batch (gpt-fast style: `prefill`, `forward_text`, `decode`).

    kv = KVSlots(model, rows, capacity)                 # static cache, one row per request
    logits = prefill(model, inputs, upto, cache_kwarg)  # transformers' forward (images, deepstack, M-RoPE)
    kv.load(row, cache)                                 # the prefix K/V, copied into a row
    logits = forward_text(model, kv, rows, tokens, positions)  # suffixes and decode steps, text only

Why this split: transformers' forward is the only code that knows images (vision tower,
deepstack, 3-D positions), so it prefills each shared prefix, which always holds every image of
the prompt. Everything after it is text, whose M-RoPE position is the same on all three axes
(index + the prefix's rope delta), so a small text-only forward over a static, right-padded
cache runs each question's suffix and every decode step, for all rows of a batch at once.
Rows stop at their own limit, at EOS, or after a complete `[Final Answer]:` line, with the
rules of `model.generate` + the engine's `_StepWatch`, so greedy outputs are the same tokens.
"""
from __future__ import annotations

import inspect
import logging
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hitq.engine.base import Prepared

SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")  # (1, L) tensors
log = logging.getLogger("hitq.engine")
ALIGN = 64  # cache lengths are rounded up to this (aligned masks keep sdpa on its fast kernels)


def _round_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache: `cache` (transformers >= 5.2x) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def text_model(model):
    """The language model (layers, norm, rotary embedding) inside a Qwen3-VL model."""
    return model.model.language_model


def kv_bytes_per_token(model) -> int:
    c = model.config.text_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * model.dtype.itemsize


class KVSlots:
    """A static KV cache: per layer (rows, kv_heads, capacity, head_dim) for keys and values.
    Row r holds one request's tokens at positions [0, lengths[r]) (right padding)."""

    def __init__(self, model, rows: int, capacity: int):
        c = model.config.text_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        shape = (rows, c.num_key_value_heads, _round_up(capacity), head_dim)
        device = next(model.parameters()).device
        # Zeros, not empty: masked-out slots still enter the attention's value product (weight 0),
        # and 0 × a NaN left in uninitialised memory is NaN.
        self.k = [torch.zeros(shape, dtype=model.dtype, device=device) for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=model.dtype, device=device) for _ in range(c.num_hidden_layers)]
        self.lengths = [0] * rows

    def load(self, row: int, cache, n: int) -> None:
        """Copy the first n positions of a transformers DynamicCache (batch 1) into `row`."""
        for i, (k, v) in enumerate(_cache_tensors(cache)):
            self.k[i][row, :, :n] = k[0, :, :n]
            self.v[i][row, :, :n] = v[0, :, :n]
        self.lengths[row] = n

    def keep(self, rows: list[int]) -> None:
        """Move `rows` to the front (in that order) and drop the others; layer by layer, in place."""
        index = torch.tensor(rows, device=self.k[0].device)
        span = _round_up(max(self.lengths[r] for r in rows))
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                t[: len(rows), :, :span] = t[index, :, :span]
                store[i] = t[: len(rows)]
        self.lengths = [self.lengths[r] for r in rows]


def _cache_tensors(cache):
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def prefill(model, inputs: dict, upto: int, kwarg: str) -> tuple[torch.Tensor, object, int]:
    """transformers' forward over the first `upto` tokens of one request (every image inside).
    Returns (logits of the last token, the DynamicCache, the rope delta of later text tokens)."""
    seq = {k: v[:, :upto] for k, v in inputs.items() if k in SEQ_KEYS}
    rest = {k: v for k, v in inputs.items() if k not in SEQ_KEYS}
    model.model.rope_deltas = None  # stale deltas from an earlier request must not leak in
    out = model(**seq, **rest, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    delta = 0
    if "image_grid_thw" in inputs and model.model.rope_deltas is not None:
        delta = int(model.model.rope_deltas.reshape(-1)[0])
    model.model.rope_deltas = None
    return out.logits[:, -1], cache, delta


def forward_text(model, kv: KVSlots, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Run text tokens (rows, T) at rope `positions` (rows, T) over all rows of `kv`, appending
    their K/V at each row's length; returns the last position's logits (rows, vocab)."""
    lm = text_model(model)
    rope = sys.modules[type(lm.layers[0].self_attn).__module__].apply_rotary_pos_emb
    B, T = tokens.shape
    starts = torch.tensor(kv.lengths, device=tokens.device)
    span = _round_up(max(kv.lengths) + T)
    slots = starts[:, None] + torch.arange(T, device=tokens.device)  # (B, T) cache index of each new token
    visible = torch.arange(span, device=tokens.device)[None, None, :] <= slots[:, :, None]  # (B, T, span)
    h = lm.embed_tokens(tokens)
    cos, sin = lm.rotary_emb(h, positions[None].expand(3, B, T))
    rows = torch.arange(B, device=tokens.device)[:, None]
    for i, layer in enumerate(lm.layers):
        a = layer.self_attn
        x = layer.input_layernorm(h)
        q = a.q_norm(a.q_proj(x).view(B, T, -1, a.head_dim)).transpose(1, 2)
        k = a.k_norm(a.k_proj(x).view(B, T, -1, a.head_dim)).transpose(1, 2)
        v = a.v_proj(x).view(B, T, -1, a.head_dim).transpose(1, 2)
        q, k = rope(q, k, cos, sin)
        kv.k[i][rows, :, slots] = k.transpose(1, 2)
        kv.v[i][rows, :, slots] = v.transpose(1, 2)
        h = h + a.o_proj(_attend(q, kv.k[i][:, :, :span], kv.v[i][:, :, :span], visible, a.scaling))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    kv.lengths = [n + T for n in kv.lengths]
    return model.lm_head(lm.norm(h[:, -1]))


def _attend(q, k, v, visible, scale) -> torch.Tensor:
    """Grouped-query attention without repeating K/V: the G query heads of each KV head are
    folded into the query length. q (B, Hq, T, D), k/v (B, Hkv, S, D), visible (B, T, S)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    q = q.reshape(B, Hkv, G * T, D)
    mask = visible[:, None, None].expand(B, 1, G, T, visible.shape[-1]).reshape(B, 1, G * T, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.reshape(B, Hq, T, D).transpose(1, 2).reshape(B, T, Hq * D)


# -- requests, groups and stopping ------------------------------------------------------------


@dataclass
class Row:
    """One request in a decode batch: its limit, how it stops, the tokens it made so far."""

    prepared: Prepared
    limit: int  # new tokens at most (exactly, when forced)
    forced: bool = False  # generate exactly `limit` tokens: no EOS, no answer stop (benchmarks)
    ids: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class Group:
    """Requests that share their first `split` prompt tokens (prefix_key, images inside)."""

    rows: list[Row]
    split: int

    @property
    def longest(self) -> int:
        return max(r.prepared.inputs["input_ids"].shape[1] for r in self.rows)


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if len(diff) else n


def make_groups(rows: list[Row], image_token_id: int) -> list[Group]:
    """Rows with equal prefix_key share the longest common token prefix, provided it holds all
    their image tokens and their pixels are equal; each row keeps at least one suffix token."""
    by_key: dict = {}
    for r in rows:
        by_key.setdefault(r.prepared.prefix_key or id(r), []).append(r)
    groups = []
    for members in by_key.values():
        if len(members) == 1:
            groups.append(Group(members, members[0].prepared.inputs["input_ids"].shape[1]))
            continue
        ids = [m.prepared.inputs["input_ids"][0] for m in members]
        split = min(min(common_prefix(ids[0], x) for x in ids[1:]), min(x.numel() for x in ids) - 1)
        images = [(x == image_token_id).nonzero() for x in ids]
        last_image = max((int(i[-1]) + 1 for i in images if len(i)), default=0)
        pixels = [m.prepared.inputs.get("pixel_values") for m in members]
        same_pixels = all(p is None for p in pixels) or all(
            p is not None and p.shape == pixels[0].shape and torch.equal(p, pixels[0]) for p in pixels)
        if split >= last_image and same_pixels and split > 0:
            groups.append(Group(members, split))
        else:
            groups.extend(Group([m], m.prepared.inputs["input_ids"].shape[1]) for m in members)
    return groups


class Stopper:
    """Decides when a row is done, with the rules of model.generate + the engine's _StepWatch."""

    def __init__(self, tokenizer, eos_ids: list[int], answer_complete):
        self.tokenizer, self.eos, self.answer_complete = tokenizer, set(eos_ids), answer_complete

    def push(self, row: Row, token: int) -> None:
        row.ids.append(token)
        if len(row.ids) >= row.limit:
            row.done = True
        elif row.forced:
            return
        elif token in self.eos:
            row.done = True
        elif row.prepared.stop_at_answer and "\n" in self.tokenizer.decode([token]):
            row.done = self.answer_complete(self.tokenizer.decode(row.ids, skip_special_tokens=True))


def batch_capacity(rows: list[Row]) -> int:
    """Cache positions a batch needs: rows that are done keep stepping until the batch compacts."""
    return max(r.prepared.inputs["input_ids"].shape[1] for r in rows) + max(r.limit for r in rows)


def prefill_group(model, g: Group, device, kwarg: str, kv: KVSlots | None = None, first: int = 0):
    """Prefill the group's prefix once (transformers), copy it into rows first.. of `kv`, run each
    row's own suffix. Returns (first-token logits of each row, the rope delta of the group)."""
    if kv is None:
        kv = KVSlots(model, len(g.rows), g.longest + 1)
    inputs = {k: (v.to(model.dtype) if v.is_floating_point() else v).to(device, non_blocking=True)
              for k, v in g.rows[0].prepared.inputs.items()}
    logits, cache, delta = prefill(model, inputs, g.split, kwarg)
    out = []
    for n, r in enumerate(g.rows, first):
        kv.load(n, cache, g.split)
        ids = r.prepared.inputs["input_ids"][0]
        if ids.numel() > g.split:  # the question's own tokens, on this row only
            one = _RowView(kv, n)
            positions = torch.arange(g.split, ids.numel(), device=device)[None] + delta
            out.append(forward_text(model, one, ids[g.split:].to(device)[None], positions))
            one.store()
        else:
            out.append(logits)
    return out, delta


# -- one decode batch -------------------------------------------------------------------------


def _pick(logits: torch.Tensor, rows: list[Row], eos_ids: list[int]) -> list[int]:
    """Greedy next tokens; forced rows never pick EOS (like min_new_tokens in model.generate)."""
    forced = [i for i, r in enumerate(rows) if r.forced]
    if forced:
        logits = logits.clone()
        logits[torch.tensor(forced, device=logits.device)[:, None], torch.tensor(eos_ids, device=logits.device)] = float("-inf")
    return logits.argmax(-1).tolist()


def run_batch(model, groups: list[Group], stopper: Stopper, eos_ids: list[int], device: torch.device,
              kwarg: str, sync) -> dict:
    """Prefill every group into a shared static cache, then decode all rows together.
    Returns the timings: {"prefill_s", "decode_s", "steps", "rows", "capacity"}."""
    rows = [r for g in groups for r in g.rows]
    capacity = batch_capacity(rows)
    sync()
    start = time.perf_counter()
    kv = KVSlots(model, len(rows), capacity)
    firsts, deltas = [], []
    for g in groups:
        logits, delta = prefill_group(model, g, device, kwarg, kv, len(deltas))
        firsts += logits
        deltas += [delta] * len(g.rows)
    tokens = _pick(torch.cat(firsts), rows, eos_ids)
    sync()
    prefill_end = time.perf_counter()
    steps, active = 0, list(range(len(rows)))  # rows of `kv`, in order, still decoding
    for i, t in zip(active, tokens):
        stopper.push(rows[i], t)
    while True:
        live = [j for j, i in enumerate(active) if not rows[i].done]
        if not live:
            break
        if len(live) <= len(active) // 2:  # compact: later steps read only live rows' K/V
            kv.keep(live)
            active = [active[j] for j in live]
        last = torch.tensor([[rows[i].ids[-1]] for i in active], device=device)
        positions = torch.tensor([[kv.lengths[j] + deltas[i]] for j, i in enumerate(active)], device=device)
        logits = forward_text(model, kv, last, positions)
        steps += 1
        for i, t in zip(active, _pick(logits, [rows[i] for i in active], eos_ids)):
            if not rows[i].done:
                stopper.push(rows[i], t)
    sync()
    end = time.perf_counter()
    log.info("decode batch: %d rows, %d groups, capacity %d, prefill %.2f s, %d steps in %.2f s", len(rows), len(groups),
             capacity, prefill_end - start, steps, end - prefill_end)
    return {"prefill_s": prefill_end - start, "decode_s": end - prefill_end, "steps": steps,
            "rows": len(rows), "capacity": _round_up(capacity)}


class _RowView:
    """One row of a KVSlots seen as a batch of one (views share storage with the full cache)."""

    def __init__(self, kv: KVSlots, row: int):
        self.parent, self.row = kv, row
        self.k = [t[row : row + 1] for t in kv.k]
        self.v = [t[row : row + 1] for t in kv.v]
        self.lengths = [kv.lengths[row]]

    def store(self) -> None:
        self.parent.lengths[self.row] = self.lengths[0]
