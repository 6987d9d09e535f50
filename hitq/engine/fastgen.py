"""Greedy generation for Qwen3-VL with shared prefixes and continuous batching (gpt-fast style).

    arena = Arena(model, positions)                           # the KV cache of every live request
    firsts, delta = prefill_group(model, group, device, kwarg, arena, starts)  # prefix once, suffix per row
    decoder = Decoder(model, arena, rows, max_k, eos_ids, graphs=True)        # one step, a CUDA graph
    next_tokens = decoder.step(live)                          # every live request at once
    figures = run(model, groups, positions, rows, ...)        # rows admitted as others stop

Why this split: transformers' forward is the only code that knows images (vision tower,
deepstack, 3-D positions), so it prefills each shared prefix, which always holds every image of
the prompt. Everything after it is text, whose M-RoPE position is the same on all three axes
(index + the prefix's rope delta), so a small text-only forward over the arena runs each
question's suffix and every decode step. A decode step has fixed shapes (all decode positions;
flash-attention varlen reads each row's own region, however long), so on CUDA it is captured
once as a CUDA graph and replayed: no Python or kernel-launch cost per layer.

A request is admitted as soon as a decode position and a region of its size are free
(continuous batching), so a 2,048-token chart answer does not hold a batch of 12-token answers,
and a 99k-token prompt takes 99k positions, not those of the batch's longest row.
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


class Arena:
    """The KV cache of every live request: per layer one flat (positions, kv_heads, head_dim)
    buffer for keys and one for values. A request owns a contiguous region of exactly its need
    (prompt + output limit), taken first-fit and given back when it stops, so long and short
    requests share the memory without padding. The last position is scratch: idle decode rows
    write there. On CUDA in bf16/fp16 attention is flash-attention's varlen kernel (each row
    reads only its own tokens, wherever its region lies); elsewhere a per-row reference path."""

    def __init__(self, model, positions: int):
        c = model.config.text_config
        self.heads, self.head_dim = c.num_key_value_heads, _head_dim(c)
        device = next(model.parameters()).device
        shape = (positions + 1, self.heads, self.head_dim)
        # Zeros, not empty: NaNs left in uninitialised memory must not reach a masked product.
        self.k = [torch.zeros(shape, dtype=model.dtype, device=device) for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=model.dtype, device=device) for _ in range(c.num_hidden_layers)]
        self.scratch = positions
        self.free = [(0, positions)]  # (start, size), sorted by start
        self.flash = device.type == "cuda" and model.dtype in (torch.bfloat16, torch.float16)

    def take(self, n: int) -> int | None:
        """The start of a free region of n positions (first fit), or None."""
        for i, (start, size) in enumerate(self.free):
            if size >= n:
                self.free[i : i + 1] = [(start + n, size - n)] if size > n else []
                return start
        return None

    def give(self, start: int, n: int) -> None:
        self.free.append((start, n))
        self.free.sort()
        merged = [self.free[0]]
        for s, size in self.free[1:]:
            if merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((s, size))
        self.free = merged

    def load(self, start: int, cache, n: int) -> None:
        """Copy the first n positions of a transformers DynamicCache (batch 1) to start.."""
        for i, (k, v) in enumerate(_cache_tensors(cache)):
            self.k[i][start : start + n] = k[0, :, :n].transpose(0, 1)
            self.v[i][start : start + n] = v[0, :, :n].transpose(0, 1)


@dataclass
class Where:
    """Where one forward_text call writes and reads: R rows of T new tokens each.
    write (R, T) arena index of each new token; starts (R + 1,) int32 region starts (the last
    entry unused); used (R,) int32 positions each row attends to, its new tokens included;
    max_k the largest region. host: (starts, used) as lists, for the reference path."""

    write: torch.Tensor
    starts: torch.Tensor
    used: torch.Tensor
    max_k: int
    host: tuple | None = None

    @classmethod
    def rows(cls, starts: list[int], lengths: list[int], T: int, max_k: int, device) -> "Where":
        write = torch.tensor([[s + n + t for t in range(T)] for s, n in zip(starts, lengths)], device=device)
        used = [n + T for n in lengths]
        return cls(write, torch.tensor(starts + [0], dtype=torch.int32, device=device),
                   torch.tensor(used, dtype=torch.int32, device=device), max_k, (starts, used))


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


def forward_text(model, arena: Arena, tokens: torch.Tensor, positions: torch.Tensor, where: Where) -> torch.Tensor:
    """Run text tokens (R, T) at rope `positions` (R, T), writing their K/V at `where.write` and
    attending causally to each row's region; returns the last position's logits (R, vocab).
    On the flash path there are no host syncs and the shapes are fixed: a decode step can be
    captured as a CUDA graph."""
    lm = text_model(model)
    rope = sys.modules[type(lm.layers[0].self_attn).__module__].apply_rotary_pos_emb
    R, T = tokens.shape
    h = lm.embed_tokens(tokens)
    cos, sin = lm.rotary_emb(h, positions[None].expand(3, R, T))
    for i, layer in enumerate(lm.layers):
        a = layer.self_attn
        x = layer.input_layernorm(h)
        q = a.q_norm(a.q_proj(x).view(R, T, -1, a.head_dim)).transpose(1, 2)
        k = a.k_norm(a.k_proj(x).view(R, T, -1, a.head_dim)).transpose(1, 2)
        v = a.v_proj(x).view(R, T, -1, a.head_dim).transpose(1, 2)
        q, k = rope(q, k, cos, sin)
        arena.k[i][where.write] = k.transpose(1, 2)
        arena.v[i][where.write] = v.transpose(1, 2)
        attend = _attend_flash if arena.flash else _attend_reference
        h = h + a.o_proj(attend(q, arena.k[i], arena.v[i], where, a.scaling))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(lm.norm(h[:, -1]))


def _attend_flash(q, k, v, where: Where, scale) -> torch.Tensor:
    """flash-attention varlen over the arena: row r reads k/v[starts[r] : starts[r] + used[r]].
    One new token per row (decode): the G query heads of each KV head become G query "tokens"
    of an MHA call, so each K/V block is read once for all of them (not once per query head)."""
    R, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    if T == 1:
        packed = q[:, :, 0].reshape(R, Hkv, G, D).transpose(1, 2).reshape(R * G, Hkv, D)
        cu_q = torch.arange(0, R * G + 1, G, dtype=torch.int32, device=q.device)
        out = torch.ops.aten._flash_attention_forward(packed, k, v, cu_q, where.starts, G, where.max_k, 0.0, False, False,
                                                      scale=scale, seqused_k=where.used)[0]
        return out.reshape(R, G, Hkv, D).transpose(1, 2).reshape(R, 1, Hq * D)
    packed = q.transpose(1, 2).reshape(R * T, Hq, D)
    cu_q = torch.arange(0, R * T + 1, T, dtype=torch.int32, device=q.device)
    out = torch.ops.aten._flash_attention_forward(packed, k, v, cu_q, where.starts, T, where.max_k, 0.0, True, False,
                                                  scale=scale, seqused_k=where.used)[0]  # causal: bottom-right aligned
    return out.reshape(R, T, Hq * D)


def _attend_reference(q, k, v, where: Where, scale) -> torch.Tensor:
    """The same attention row by row with sdpa (CPU, fp32; tests compare it with model.generate)."""
    R, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    outs = []
    for r, (start, used) in enumerate(zip(*where.host)):
        keys = k[start : start + used].transpose(0, 1)[None]  # (1, Hkv, used, D)
        values = v[start : start + used].transpose(0, 1)[None]
        visible = torch.arange(used, device=q.device)[None, :] <= torch.arange(used - T, used, device=q.device)[:, None]
        mask = visible[None, None, None].expand(1, 1, G, T, used).reshape(1, 1, G * T, used)
        out = F.scaled_dot_product_attention(q[r : r + 1].reshape(1, Hkv, G * T, D), keys, values, attn_mask=mask, scale=scale)
        outs.append(out.reshape(1, Hq, T, D))
    return torch.cat(outs).transpose(1, 2).reshape(R, T, Hq * D)


# -- decode steps -----------------------------------------------------------------------------


class Decoder:
    """One greedy decode step over `rows` batch positions: next tokens (EOS forbidden on forced
    rows). With graphs=True (flash path) the step is captured once as a CUDA graph and replayed;
    its inputs travel through one static (5, rows) buffer: tokens, rope positions, write index,
    region start, positions used. Idle positions write to the arena's scratch position."""

    def __init__(self, model, arena: Arena, rows: int, max_k: int, eos_ids: list[int], graphs: bool):
        self.model, self.arena, self.rows, self.max_k = model, arena, rows, max_k
        device = arena.k[0].device
        self.inputs = torch.zeros((5, rows), dtype=torch.long, device=device)
        self.starts = torch.zeros(rows + 1, dtype=torch.int32, device=device)
        self.used = torch.zeros(rows, dtype=torch.int32, device=device)
        self.eos = torch.tensor(eos_ids, device=device)
        self.forbid = torch.zeros(rows, dtype=torch.bool, device=device)
        self.graph = None
        self.graphs = graphs and arena.flash

    def _step(self, host=None) -> torch.Tensor:
        tokens, positions, write, starts, used = self.inputs
        self.starts[:-1].copy_(starts)
        self.used.copy_(used)
        where = Where(write[:, None], self.starts, self.used, self.max_k, host)
        logits = forward_text(self.model, self.arena, tokens[:, None], positions[:, None], where)
        blocked = torch.where(self.forbid[:, None], float("-inf"), logits[:, self.eos])
        logits[:, self.eos] = blocked.to(logits.dtype)
        return logits.argmax(-1)

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (cuBLAS workspaces, allocator)
            self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._step()

    def step(self, live: dict) -> list[int]:
        """live: batch position -> (last token, rope position, region start, length, forced).
        Appends each live row's token at start + length; returns every position's next token."""
        scratch = self.arena.scratch
        cols = [live.get(i, (0, 0, scratch, 0, False)) for i in range(self.rows)]
        tokens, positions, starts, lengths, forced = (list(c) for c in zip(*cols))
        write = [s + n for s, n in zip(starts, lengths)]
        used = [n + 1 for n in lengths]
        self.inputs.copy_(torch.tensor([tokens, positions, write, starts, used]), non_blocking=True)
        self.forbid.copy_(torch.tensor(forced), non_blocking=True)
        if not self.graphs:
            return self._step((starts, used)).tolist()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.out.tolist()


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


def prefill_group(model, g: Group, device, kwarg: str, arena: Arena | None = None, starts: list[int] | None = None):
    """Prefill the group's prefix once (transformers), copy it to each row's region of `arena`
    (`starts`), run each row's own suffix there. Returns (first-token logits of each row, the
    rope delta of the group)."""
    if arena is None:
        arena = Arena(model, len(g.rows) * g.longest)
        starts = [arena.take(g.longest) for _ in g.rows]
    inputs = _to_device(g.rows[0].prepared.inputs, model, device)
    logits, cache, delta = prefill(model, inputs, g.split, kwarg)
    for start in starts:
        arena.load(start, cache, g.split)
    del cache
    out = []
    for start, r in zip(starts, g.rows):
        ids = r.prepared.inputs["input_ids"][0]
        if ids.numel() > g.split:  # the question's own tokens, on this row only
            suffix = ids[g.split :].to(device)[None]
            positions = torch.arange(g.split, ids.numel(), device=device)[None] + delta
            where = Where.rows([start], [g.split], suffix.shape[1], r.length + r.limit, device)
            out.append(forward_text(model, arena, suffix, positions, where))
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


# -- continuous batching ----------------------------------------------------------------------


def run(model, groups: list[Group], positions: int, rows: int, stopper: Stopper, eos_ids: list[int], device,
        kwarg: str, sync, graphs: bool) -> dict:
    """Run `groups` (in admission order) through an arena of `positions` cache positions and
    `rows` decode positions: a group is admitted (prefilled) as soon as its rows find free decode
    positions and regions, every live row decodes together, a stopped row frees both at once.
    Each row's `timing` gets its group's prefill time and its admission-to-stop time.
    Returns the figures: {"prefill_s", "decode_s", "steps", "rows", "positions", "most_live", "seconds"}."""
    need = max(sum(r.length + r.limit for r in g.rows) for g in groups)
    if need > positions:
        raise torch.cuda.OutOfMemoryError(f"a group needs {need} cache positions, {positions} fit in memory")
    sync()
    start = time.perf_counter()
    arena = Arena(model, positions)
    decoder = Decoder(model, arena, rows, max(g.need for g in groups), eos_ids, graphs)
    pending, free, live = deque(groups), list(range(rows))[::-1], {}  # live: batch position -> (row, region, delta)
    prefill_s = steps = most = 0
    while pending or live:
        while pending and len(pending[0].rows) <= len(free):
            g = pending[0]
            regions = [arena.take(r.length + r.limit) for r in g.rows]
            if None in regions:  # memory is full until live rows stop
                for region, r in zip(regions, g.rows):
                    if region is not None:
                        arena.give(region, r.length + r.limit)
                break
            pending.popleft()
            t0 = time.perf_counter()
            logits, delta = prefill_group(model, g, device, kwarg, arena, regions)
            firsts = _pick(torch.cat(logits), g.rows, eos_ids)
            t1 = time.perf_counter()  # the token list above waited for the prefill
            prefill_s += t1 - t0
            for region, r, token in zip(regions, g.rows, firsts):
                r.timing.update(prefill_s=t1 - t0, admitted=t0)
                stopper.push(r, token)
                if r.done:
                    arena.give(region, r.length + r.limit)
                    r.timing["seconds"] = time.perf_counter() - t0
                else:
                    live[free.pop()] = (r, region, delta)
        if not live:
            if pending:  # nothing live and still no room: cannot happen, every group fits alone
                raise torch.cuda.OutOfMemoryError("no room for the next request in an empty cache")
            continue
        step = {i: (r.ids[-1], r.length + len(r.ids) - 1 + delta, region, r.length + len(r.ids) - 1, r.forced)
                for i, (r, region, delta) in live.items()}
        next_tokens = decoder.step(step)
        steps, most = steps + 1, max(most, len(live))
        now = time.perf_counter()
        for i, (r, region, _) in list(live.items()):
            stopper.push(r, next_tokens[i])
            if r.done:
                del live[i]
                free.append(i)
                arena.give(region, r.length + r.limit)
                r.timing["seconds"] = now - r.timing["admitted"]
    sync()
    wall = time.perf_counter() - start
    n = sum(len(g.rows) for g in groups)
    log.info("decode: %d rows, %d groups, %d positions, up to %d of %d rows live, prefill %.2f s, %d steps, %.2f s in all%s",
             n, len(groups), positions, most, rows, prefill_s, steps, wall, ", CUDA graph" if decoder.graphs else "")
    return {"prefill_s": prefill_s, "decode_s": wall - prefill_s, "steps": steps, "rows": n, "positions": positions,
            "most_live": most, "seconds": wall}
