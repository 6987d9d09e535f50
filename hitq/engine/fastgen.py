"""Greedy generation for Qwen3-VL with shared prefixes and continuous batching (gpt-fast style).

    kv = KVSlots(model, slots, capacity)                      # static cache, one slot per live request
    firsts, delta = prefill_group(model, group, device, kwarg, kv, slots)   # prefix once, suffix per row
    decoder = Decoder(model, kv, eos_ids, graphs=True)        # one decode step, CUDA graph per span bucket
    next_tokens = decoder.step(tokens, positions, forbid)     # all slots at once
    timings = run_pool(model, groups, ...)                    # slots refilled as rows finish

Why this split: transformers' forward is the only code that knows images (vision tower,
deepstack, 3-D positions), so it prefills each shared prefix, which always holds every image of
the prompt. Everything after it is text, whose M-RoPE position is the same on all three axes
(index + the prefix's rope delta), so a small text-only forward over a static, right-padded
cache runs each question's suffix and every decode step. Decode steps have fixed shapes (all
slots, attention span rounded up to a bucket), so on CUDA each bucket is captured once as a CUDA
graph and replayed: no Python or kernel-launch cost per layer.

A slot is refilled as soon as its request stops (continuous batching), so a 2,048-token chart
answer does not hold a batch of 12-token answers. Requests are split into pools of similar
length (hitq.engine.planner) so that a slot's capacity is not mostly padding.
Rows stop at their own limit, at EOS, or after a complete `[Final Answer]:` line, with the
rules of `model.generate` + the engine's `_StepWatch`, so greedy outputs are the same tokens.
"""
from __future__ import annotations

import inspect
import logging
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hitq.engine.base import Prepared

SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")  # (1, L) tensors
log = logging.getLogger("hitq.engine")
ALIGN = 64  # cache lengths are rounded up to this (aligned masks keep the kernels on their fast paths)


def _round_up(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache: `cache` (transformers >= 5.2x) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def text_model(model):
    """The language model (layers, norm, rotary embedding) inside a Qwen3-VL model."""
    return model.model.language_model


def _head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def kv_bytes_per_token(model) -> int:
    c = model.config.text_config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * _head_dim(c) * model.dtype.itemsize


class KVSlots:
    """A static KV cache: per layer (slots, kv_heads, capacity, head_dim) for keys and values.
    Slot s holds one request's tokens at positions [0, lengths[s]) (right padding)."""

    def __init__(self, model, slots: int, capacity: int):
        c = model.config.text_config
        shape = (slots, c.num_key_value_heads, _round_up(capacity), _head_dim(c))
        device = next(model.parameters()).device
        # Zeros, not empty: masked-out positions still enter the attention's value product (weight 0),
        # and 0 x a NaN left in uninitialised memory is NaN.
        self.k = [torch.zeros(shape, dtype=model.dtype, device=device) for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=model.dtype, device=device) for _ in range(c.num_hidden_layers)]
        self.lengths = [0] * slots
        self.capacity = shape[2]

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def load(self, slot: int, cache, n: int) -> None:
        """Copy the first n positions of a transformers DynamicCache (batch 1) into `slot`."""
        for i, (k, v) in enumerate(_cache_tensors(cache)):
            self.k[i][slot, :, :n] = k[0, :, :n]
            self.v[i][slot, :, :n] = v[0, :, :n]
        self.lengths[slot] = n


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


def forward_text(model, kv: KVSlots, first: int, tokens: torch.Tensor, positions: torch.Tensor,
                 starts: torch.Tensor, span: int) -> torch.Tensor:
    """Run text tokens (R, T) at rope `positions` (R, T) on slots first..first+R of `kv`, writing
    their K/V at `starts` (R,) onwards and attending to the first `span` positions (masked to
    each row's own length); returns the last position's logits (R, vocab). No host syncs, fixed
    shapes: a decode step over all slots can be captured as a CUDA graph."""
    lm = text_model(model)
    rope = sys.modules[type(lm.layers[0].self_attn).__module__].apply_rotary_pos_emb
    R, T = tokens.shape
    index = starts[:, None] + torch.arange(T, device=tokens.device)  # (R, T) cache position of each new token
    visible = torch.arange(span, device=tokens.device)[None, None, :] <= index[:, :, None]  # (R, T, span)
    h = lm.embed_tokens(tokens)
    cos, sin = lm.rotary_emb(h, positions[None].expand(3, R, T))
    rows = torch.arange(R, device=tokens.device)[:, None]
    for i, layer in enumerate(lm.layers):
        a = layer.self_attn
        x = layer.input_layernorm(h)
        q = a.q_norm(a.q_proj(x).view(R, T, -1, a.head_dim)).transpose(1, 2)
        k = a.k_norm(a.k_proj(x).view(R, T, -1, a.head_dim)).transpose(1, 2)
        v = a.v_proj(x).view(R, T, -1, a.head_dim).transpose(1, 2)
        q, k = rope(q, k, cos, sin)
        keys, values = kv.k[i][first : first + R], kv.v[i][first : first + R]
        keys[rows, :, index] = k.transpose(1, 2)
        values[rows, :, index] = v.transpose(1, 2)
        h = h + a.o_proj(_attend(q, keys[:, :, :span], values[:, :, :span], visible, a.scaling))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(lm.norm(h[:, -1]))


def _attend(q, k, v, visible, scale) -> torch.Tensor:
    """Grouped-query attention without repeating K/V: the G query heads of each KV head are
    folded into the query length. q (R, Hq, T, D), k/v (R, Hkv, S, D), visible (R, T, S).

    One new token per row (decode): two batched matmuls, which spread a long span over the whole
    GPU (sdpa's kernels parallelise over query blocks, of which a decode step has one per head).
    Several tokens (a question's suffix): sdpa."""
    R, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    q = q.reshape(R, Hkv, G * T, D)
    mask = visible[:, None, None].expand(R, 1, G, T, visible.shape[-1]).reshape(R, 1, G * T, -1)
    if T == 1:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.reshape(R, Hq, T, D).transpose(1, 2).reshape(R, T, Hq * D)


# -- decode steps -----------------------------------------------------------------------------


class Decoder:
    """One greedy decode step over every slot of `kv`: next tokens (EOS forbidden on forced rows).

    With graphs=True (CUDA), each attention span bucket is captured once as a CUDA graph and
    replayed; inputs travel through one static (4, slots) buffer: tokens, rope positions, cache
    positions, forbid-EOS flags."""

    def __init__(self, model, kv: KVSlots, eos_ids: list[int], graphs: bool):
        self.model, self.kv = model, kv
        device = kv.k[0].device
        self.inputs = torch.zeros((4, kv.slots), dtype=torch.long, device=device)
        self.eos = torch.tensor(eos_ids, device=device)
        self.quantum = max(ALIGN * 4, _round_up(kv.capacity // 16))
        self.graphs: dict[int, tuple] = {} if graphs else None
        self.pool = torch.cuda.graph_pool_handle() if graphs else None

    def _step(self, span: int) -> torch.Tensor:
        tokens, positions, starts, forbid = self.inputs
        logits = forward_text(self.model, self.kv, 0, tokens[:, None], positions[:, None], starts, span)
        blocked = torch.where(forbid[:, None].bool(), float("-inf"), logits[:, self.eos])
        logits[:, self.eos] = blocked.to(logits.dtype)
        return logits.argmax(-1)

    def _capture(self, span: int):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (cuBLAS workspaces, allocator)
            self._step(span)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._step(span)
        self.graphs[span] = (graph, out)
        return self.graphs[span]

    def step(self, tokens: list[int], positions: list[int], forbid: list[int]) -> list[int]:
        """Append one token to every slot (at kv.lengths); returns each slot's next token.
        Slots without a live request step too (at their current length) and are ignored."""
        starts = self.kv.lengths
        span = min(self.kv.capacity, _round_up(max(starts) + 1, self.quantum))
        self.inputs.copy_(torch.tensor([tokens, positions, starts, forbid], dtype=torch.long), non_blocking=True)
        if self.graphs is None:
            out = self._step(span)
        else:
            graph, out = self.graphs.get(span) or self._capture(span)
            graph.replay()
        return out.tolist()


# -- requests, groups and stopping ------------------------------------------------------------


@dataclass
class Row:
    """One request: its limit, how it stops, the tokens it made so far."""

    prepared: Prepared
    limit: int  # new tokens at most (exactly, when forced)
    forced: bool = False  # generate exactly `limit` tokens: no EOS, no answer stop (benchmarks)
    ids: list[int] = field(default_factory=list)
    done: bool = False
    timing: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.prepared.inputs["input_ids"].shape[1]


@dataclass
class Group:
    """Requests that share their first `split` prompt tokens (prefix_key, images inside)."""

    rows: list[Row]
    split: int

    @property
    def longest(self) -> int:
        return max(r.length for r in self.rows)

    @property
    def need(self) -> int:
        """Cache positions the group's longest row can reach."""
        return max(r.length + r.limit for r in self.rows)


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
            groups.append(Group(members, members[0].length))
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
            groups.extend(Group([m], m.length) for m in members)
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


def _to_device(inputs: dict, model, device) -> dict:
    return {k: (v.to(model.dtype) if v.is_floating_point() else v).to(device, non_blocking=True) for k, v in inputs.items()}


def prefill_group(model, g: Group, device, kwarg: str, kv: KVSlots | None = None, slots: list[int] | None = None):
    """Prefill the group's prefix once (transformers), copy it into `slots` of `kv`, run each
    row's own suffix there. Returns (first-token logits of each row, the rope delta of the group)."""
    if kv is None:
        kv = KVSlots(model, len(g.rows), g.longest + 1)
    slots = list(range(len(g.rows))) if slots is None else slots
    inputs = _to_device(g.rows[0].prepared.inputs, model, device)
    logits, cache, delta = prefill(model, inputs, g.split, kwarg)
    for slot in slots:
        kv.load(slot, cache, g.split)
    del cache
    out = []
    for slot, r in zip(slots, g.rows):
        ids = r.prepared.inputs["input_ids"][0]
        if ids.numel() > g.split:  # the question's own tokens, on this row only
            suffix = ids[g.split :].to(device)[None]
            positions = torch.arange(g.split, ids.numel(), device=device)[None] + delta
            starts = torch.tensor([g.split], device=device)
            out.append(forward_text(model, kv, slot, suffix, positions, starts, _round_up(ids.numel())))
            kv.lengths[slot] = ids.numel()
        else:
            out.append(logits)
    return out, delta


def _pick(logits: torch.Tensor, rows: list[Row], eos_ids: list[int]) -> list[int]:
    """Greedy next tokens; forced rows never pick EOS (like min_new_tokens in model.generate)."""
    forced = [i for i, r in enumerate(rows) if r.forced]
    if forced:
        logits = logits.clone()
        logits[torch.tensor(forced, device=logits.device)[:, None], torch.tensor(eos_ids, device=logits.device)] = float("-inf")
    return logits.argmax(-1).tolist()


# -- one pool: continuous batching ------------------------------------------------------------


def run_pool(model, groups: list[Group], slots: int, stopper: Stopper, eos_ids: list[int], device: torch.device,
             kwarg: str, sync, graphs: bool) -> dict:
    """Run `groups` (in order) through `slots` cache slots: a group is admitted (prefilled) as soon
    as enough slots are free, every live row decodes together, a finished row frees its slot.
    Each row's `timing` gets its group's prefill time and its admission-to-finish time.
    Returns the pool's figures: {"prefill_s", "decode_s", "steps", "rows", "slots", "capacity"}."""
    capacity = max(g.need for g in groups)
    sync()
    start = time.perf_counter()
    kv = KVSlots(model, slots, capacity)
    decoder = Decoder(model, kv, eos_ids, graphs)
    pending, free, live = deque(groups), list(range(slots))[::-1], {}  # live: slot -> (row, rope delta)
    prefill_s = steps = 0
    while pending or live:
        while pending and len(pending[0].rows) <= len(free):
            g = pending.popleft()
            taken = [free.pop() for _ in g.rows]
            t0 = time.perf_counter()
            logits, delta = prefill_group(model, g, device, kwarg, kv, taken)
            firsts = _pick(torch.cat(logits), g.rows, eos_ids)
            t1 = time.perf_counter()  # the token list above waited for the prefill
            prefill_s += t1 - t0
            for slot, r, token in zip(taken, g.rows, firsts):
                r.timing.update(prefill_s=t1 - t0, admitted=t0)
                stopper.push(r, token)
                if r.done:
                    free.append(slot)
                    kv.lengths[slot] = 0
                    r.timing["seconds"] = time.perf_counter() - t0
                else:
                    live[slot] = (r, delta)
        if not live:
            continue
        tokens, positions, forbid = [0] * slots, [0] * slots, [0] * slots
        for slot, (r, delta) in live.items():
            tokens[slot], positions[slot], forbid[slot] = r.ids[-1], kv.lengths[slot] + delta, int(r.forced)
        next_tokens = decoder.step(tokens, positions, forbid)
        steps += 1
        now = time.perf_counter()
        for slot, (r, _) in list(live.items()):
            kv.lengths[slot] += 1
            stopper.push(r, next_tokens[slot])
            if r.done:
                del live[slot]
                free.append(slot)
                kv.lengths[slot] = 0  # a free slot must not widen the attention span
                r.timing["seconds"] = now - r.timing["admitted"]
    sync()
    wall = time.perf_counter() - start
    rows = sum(len(g.rows) for g in groups)
    log.info("pool: %d rows, %d groups, %d slots x %d, prefill %.2f s, %d steps, %.2f s in all%s", rows, len(groups),
             slots, kv.capacity, prefill_s, steps, wall, f", {len(decoder.graphs)} CUDA graphs" if graphs else "")
    return {"prefill_s": prefill_s, "decode_s": wall - prefill_s, "steps": steps, "rows": rows, "slots": slots,
            "capacity": kv.capacity, "pool_seconds": wall}
