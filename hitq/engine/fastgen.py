"""Greedy generation for Qwen3-VL with shared prefixes and continuous batching (gpt-fast style).

    arena = Arena(model, positions)                           # the KV cache of every live request
    firsts, delta = prefill_group(model, group, device, kwarg, arena, starts)  # prefix once, then suffixes
    decoder = Decoder(model, arena, rows, max_k, eos_ids, graphs=True)        # one step, a CUDA graph
    next_tokens = decoder.step(live)                          # every live request at once
    figures = run(model, groups, positions, rows, ...)        # rows admitted as others stop

Why this split: transformers' forward is the only code that knows images (vision tower,
deepstack, 3-D positions), so it prefills each shared prefix, which always holds every image of
the prompt. Everything after it is text, whose M-RoPE position is the same on all three axes
(index + the prefix's rope delta), so a small text-only forward over the arena runs each
question's suffix and every decode step (its elementwise steps fused: hitq.engine.fused). A
decode step has fixed shapes (all decode positions; varlen attention reads each row's own
region, however long), so on CUDA it is captured once as a CUDA graph and replayed: no Python
or kernel-launch cost per layer.

A request is admitted as soon as a decode position and a region of its size are free
(continuous batching), so a 2,048-token chart answer does not hold a batch of 12-token answers,
and a 99k-token prompt takes 99k positions, not those of the batch's longest row.
Rows stop at their own limit, at EOS, or after a complete `[Final Answer]:` line, with the
rules of `model.generate` + the engine's `_StepWatch`, so greedy outputs are the same tokens.
"""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hitq.engine import fused, planner, splitkv
from hitq.engine.base import Prepared

SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")  # (1, L) tensors
LONG_ANSWER = 1024  # a row allowed more new tokens than this is a long answer (charts: 2,048)
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
    buffer for keys and one for values. A prefix group owns one region for its shared prefix and
    each of its requests one for its own suffix + output limit, taken first-fit and given back
    when done, so long and short requests share the memory without padding. The last position
    is scratch: idle decode rows write there. On CUDA in bf16/fp16 attention is PyTorch's varlen
    kernels (flash, memory-efficient for decode: each row reads only its own positions, wherever
    they lie); elsewhere a per-row reference path."""

    def __init__(self, model, positions: int):
        c = model.config.text_config
        device = next(model.parameters()).device
        shape = (positions + 1, c.num_key_value_heads, _head_dim(c))
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

    def take_all(self, sizes: list[int]) -> list[int] | None:
        """Regions of all `sizes`, or none of them (None)."""
        starts = []
        for n in sizes:
            start = self.take(n)
            if start is None:
                for got, m in zip(starts, sizes):
                    self.give(got, m)
                return None
            starts.append(start)
        return starts

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
    """Where one forward_text call writes and what it reads: R rows of T new tokens each.

    write (R, T): arena index of each new token. A row reads two segments: its group's shared
    prefix (all visible) and its own region (its suffix and outputs so far, the new tokens
    included; causal). host: per row [(prefix start, length), (own start, length)], which the
    reference path reads. slots (decode, flash path): every segment cut into pieces of one size
    across all rows, each run as one attention "sequence" for every row that reads it (the rows
    of a group share their prefix's pieces: its K/V are read once for all of them) and merged
    into each row by log-sum-exp (flash-decoding: a 99k-token row is read by many thread blocks,
    and no block reads much more than another); see `slots`. first (prefill of a prefix): the
    new tokens are the whole sequence, nothing before them: plain causal attention over them."""

    write: torch.Tensor
    host: list
    slots: tuple | None = None  # (starts (S + 1,) int32, used (S,) int32, cu_pairs (S + 1,) int32, pairs (4, P) long, max_k)
    first: bool = False

    _segments: list | None = field(default=None, init=False, repr=False)
    decode: tuple | None = field(default=None, init=False, repr=False)  # see _attend_decode

    def segments(self, device) -> list[tuple]:
        """Per segment (prefix, own): (starts (R + 1,) int32, used (R,) int32, longest), built on
        the first call and reused by every layer (the suffix path)."""
        if self._segments is None:
            self._segments = []
            for seg in (0, 1):
                starts, used = [row[seg][0] for row in self.host], [row[seg][1] for row in self.host]
                as_int = {"dtype": torch.int32, "device": device}
                self._segments.append((torch.tensor(starts + [0], **as_int), torch.tensor(used, **as_int), max(used)))
        return self._segments

    @classmethod
    def rows(cls, segments: list, T: int, device) -> "Where":
        """segments: per row ((prefix start, length), (own start, length before the new tokens))."""
        write = torch.tensor([[own + n + t for t in range(T)] for _, (own, n) in segments], device=device)
        return cls(write, [[pre, (own, n + T)] for pre, (own, n) in segments])


ROWS_PER_READ = 8  # rows reading one piece together: 8 x 4 query heads fill one query block of the kernel


def slots(host: list, S: int, scratch: int, smallest: int = 1024) -> tuple[list, list, list, list, int]:
    """The decode attention's plan. Every segment is cut into pieces of one size (at least
    `smallest`, and small enough that all fit), each piece one attention sequence ("slot") that
    the rows reading it (a group's prefix: up to ROWS_PER_READ of its rows) query together, so
    its K/V are read once. Each (slot, row) is a "pair": the row's query heads in that slot.
    Returns per slot (start, used), the slots' first pairs (cu_pairs, S + 1), per pair [owner
    row, the pairs in owner order, slot, index within the slot] (P = S pairs) and the piece size.
    Unused slots come last, read the scratch position and have no pairs; unused pairs belong to
    row R (nobody), in the last slot. A row without segments (an idle decode position) gets no
    pair. Equal pieces keep the thread blocks of one call equally busy."""
    readers: dict = {}  # (start, n) -> the rows that read that segment
    for r, row in enumerate(host):
        for start, n in row:
            if n > 0:
                readers.setdefault((start, n), []).append(r)
    reads = [(start, n, rows[i : i + ROWS_PER_READ]) for (start, n), rows in readers.items()
             for i in range(0, len(rows), ROWS_PER_READ)]
    rows_in_reads = sum(len(rows) for *_, rows in reads)
    if rows_in_reads >= S:
        raise ValueError(f"{rows_in_reads} segment reads for {S} slots")
    # pairs <= sum(n / size + 1) * rows <= S
    size = max(smallest, -(-sum(n * len(rows) for _, n, rows in reads) // (S - rows_in_reads)))
    starts, used, cu_pairs, owner, slot, index = [], [], [0], [], [], []
    for start, n, rows in reads:
        for i in range(0, n, size):
            starts.append(start + i)
            used.append(min(size, n - i))
            cu_pairs.append(cu_pairs[-1] + len(rows))
            owner += rows
            slot += [len(starts) - 1] * len(rows)
            index += range(len(rows))
    pad, R = S - len(starts), len(host)
    owner += [R] * (S - len(owner))
    slot += [S - 1] * (S - len(slot))
    index += [0] * (S - len(index))
    order = sorted(range(S), key=owner.__getitem__)
    return starts + [scratch] * pad + [0], used + [1] * pad, cu_pairs + cu_pairs[-1:] * pad, [owner, order, slot, index], size


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
    """Run text tokens (R, T) at rope `positions` (R, T), writing their K/V at `where.write`,
    each row attending to its group's prefix and causally to its own region; returns the last
    position's logits (R, vocab). On the flash path with one token per row there are no host
    syncs and the shapes are fixed: a decode step can be captured as a CUDA graph."""
    return forward_parts(model, arena, [(tokens, positions, where)])[0]


def forward_parts(model, arena: Arena, parts: list[tuple]) -> list[torch.Tensor]:
    """forward_text over several (tokens, positions, where) parts at once: every product, norm and
    rope runs over all their tokens together (flattened into one sequence) and each part gets its
    own attention, so a decode step can ride inside a prefill chunk's products (which read the
    weights anyway). One part keeps its own (R, T) shape. Returns each part's last-position logits."""
    lm = text_model(model)
    c = model.config.text_config
    sizes = [tokens.numel() for tokens, _, _ in parts]
    if len(parts) == 1:
        join, split, write = (lambda ts: ts[0]), (lambda t: [t]), parts[0][2].write
    else:
        join = lambda ts: torch.cat([flat(t) for t in ts], 1)  # noqa: E731
        split = lambda t: t.split(sizes, 1)  # noqa: E731
        write = torch.cat([where.write.reshape(1, -1) for _, _, where in parts], 1)
    h = join([lm.embed_tokens(tokens) for tokens, _, _ in parts])
    rope = [lm.rotary_emb(h, pos[None].expand(3, *pos.shape)) for _, pos, _ in parts]
    cos, sin = join([cos for cos, _ in rope]), join([sin for _, sin in rope])
    attends = [_attention(where, arena.flash) for _, _, where in parts]
    eps = lm.norm.variance_epsilon
    layers = lm.layers
    x = fused.norm(h, layers[0].input_layernorm.weight, eps)
    for i, (layer, (qkv, gate_up)) in enumerate(zip(layers, fused.projections(model))):
        a = layer.self_attn
        q, k, v = fused.attention_in(F.linear(x, qkv), a.q_norm.weight, a.k_norm.weight, eps, cos, sin,
                                     c.num_attention_heads, c.num_key_value_heads)
        arena.k[i][write] = k
        arena.v[i][write] = v
        outs = [attend(q_part.reshape(*tokens.shape, *q.shape[2:]).transpose(1, 2), arena.k[i], arena.v[i], where, a.scaling)
                for q_part, attend, (tokens, _, where) in zip(split(q), attends, parts)]
        h, x = fused.add_norm(h, a.o_proj(join(outs)), layer.post_attention_layernorm.weight, eps)
        after = layers[i + 1].input_layernorm.weight if i + 1 < len(layers) else lm.norm.weight
        h, x = fused.add_norm(h, layer.mlp.down_proj(fused.mlp_in(F.linear(x, gate_up))), after, eps)
    last = [part.reshape(*tokens.shape, -1)[:, -1] for part, (tokens, _, _) in zip(split(x), parts)]
    return list(model.lm_head(torch.cat(last) if len(last) > 1 else last[0]).split([tokens.shape[0] for tokens, _, _ in parts]))


def flat(t: torch.Tensor) -> torch.Tensor:
    """(R, T, X) -> (1, R * T, X): the parts' tokens as one sequence for the products."""
    return t.reshape(1, -1, t.shape[-1])


def _attention(where: Where, flash: bool):
    return (_attend_first if where.first else _attend_reference if not flash
            else _attend_decode if where.slots is not None else _attend_suffix)


def _flash(q, k, v, cu_q, starts, used, max_q: int, max_k: int, causal: bool, scale):
    """flash-attention varlen over the arena: sequence s reads k/v[starts[s] : starts[s] + used[s]].
    Returns (out (total_q, H, D), log-sum-exp (total_q, H) float32)."""
    out, lse = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, starts, max_q, max_k, 0.0, causal, False,
                                                       scale=scale, seqused_k=used)[:2]
    return out, lse.reshape(q.shape[1], q.shape[0]).transpose(0, 1)  # varlen lse: (H, total_q)


def decode_kernel(model) -> str:
    """The attention kernel of the model's decode steps (for the engine's description)."""
    c = model.config.text_config
    G = c.num_attention_heads // c.num_key_value_heads
    return (f"triton split-KV {splitkv.CONFIG}" if splitkv.usable(model.device, _head_dim(c), G * ROWS_PER_READ)
            else "torch memory-efficient")


def _efficient(q, k, v, cu_q, starts, used, max_q: int, max_k: int, scale, lse_at):
    """The memory-efficient kernel over the same varlen layout (no causal mask), as _flash returns
    it. Decode uses it where hitq.engine.splitkv cannot: its query blocks are smaller than flash's
    128 rows, of which a decode slot fills 4 to 32 (bench/probe-decode-h100.json: 383 vs 471 us a
    layer on an H100). lse_at: each query's (sequence, index in it): the kernel's lse is
    (sequences, heads, max_q rounded up)."""
    out, lse = torch.ops.aten._efficient_attention_forward(q[None], k[None], v[None], None, cu_q, starts, max_q, max_k,
                                                            0.0, 0, True, scale=scale, seqlen_k=used)[:2]
    return out[0], lse[lse_at[0], :, lse_at[1]]


def _merge_eager(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """Softmax-merge partial attentions over dim 1: outs (R, P, ..., D), lses (R, P, ...)."""
    weights = torch.softmax(lses, dim=1)
    return (outs.float() * weights[..., None]).sum(1).to(outs.dtype)


def _merge_into_rows_eager(outs: torch.Tensor, lses: torch.Tensor, owner: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Softmax-merge the partial attention of each pair into its owner row: outs (P, ..., D),
    lses (P, ...), owner (P,) in 0..R (R: unused pairs), table (R + 1, P): each row's pairs, then
    P (no pair). The rows' maxima are a gather over `table`, not a scattered max (atomics that
    collide: 30 us a layer on an H100). Fixed shapes, no host sync."""
    R = table.shape[0] - 1
    shape, on = (R + 1,) + lses.shape[1:], {"dtype": lses.dtype, "device": lses.device}  # float32 sums
    top = torch.cat([lses, torch.full((1,) + lses.shape[1:], float("-inf"), **on)])[table].amax(1)
    weights = torch.exp(lses - top[owner])
    total = torch.zeros(shape, **on).index_add_(0, owner, weights)
    summed = torch.zeros(shape + outs.shape[-1:], **on).index_add_(0, owner, outs.to(lses.dtype) * weights[..., None])
    # A row's largest pair weighs exp(0) = 1, so total >= 1; a row without pairs (idle) gets 0, not 0/0.
    return (summed[:R] / total[:R, ..., None].clamp_min(1)).to(outs.dtype)


_merge, _merge_into_rows = fused.Kernel(_merge_eager), fused.Kernel(_merge_into_rows_eager)


def slot_tables(owner: torch.Tensor, order: torch.Tensor, R: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From owner (P,) in 0..R and `order` (the pairs sorted by owner): each pair's query row
    (unused pairs: row 0) and the (R + 1, P) table of each row's pairs padded with P. On the
    device, no host sync."""
    P = owner.shape[0]
    count = torch.zeros(R + 1, dtype=torch.long, device=owner.device).index_add_(0, owner, torch.ones_like(owner))
    first = count.cumsum(0) - count
    at = first[:, None] + torch.arange(P, device=owner.device)[None]
    table = torch.where(at < first[:, None] + count[:, None], order[at.clamp_max(P - 1)], P)
    return torch.where(owner < R, owner, 0), table


def _attend_decode(q, k, v, where: Where, scale) -> torch.Tensor:
    """One new token per row, all pairs (slot, row: `slots`) in one attention call
    (hitq.engine.splitkv on CUDA, else PyTorch's memory-efficient kernel). The G query heads of
    each KV head become G query "tokens" of an MHA call, so each K/V block is read once for all
    of them, and once for all the rows of a slot. Unused slots, which come last, get no queries,
    so their thread blocks return at once (with G queries each, 512 idle slots cost 4 ms a step
    on an H200: bench/probe-group-h200.json)."""
    R, Hq, _, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    starts, used, cu_pairs, pairs, max_k = where.slots
    P = pairs.shape[1]
    by_triton = splitkv.usable(q.device, D, G * ROWS_PER_READ)
    if where.decode is None:  # the same for every layer
        owner, order, slot, index = pairs
        lse_at = None  # where PyTorch's kernel puts each query's log-sum-exp (Triton's are in order)
        if not by_triton:
            query = torch.arange(P * G, device=q.device)
            lse_at = (slot[query // G], index[query // G] * G + query % G)
        where.decode = (cu_pairs * G, lse_at) + slot_tables(owner, order, R)
    cu_q, lse_at, row, table = where.decode
    packed = q[:, :, 0].reshape(R, Hkv, G, D).transpose(1, 2).reshape(R, G * Hkv * D).index_select(0, row).view(P * G, Hkv, D)
    if by_triton:
        out, lse = splitkv.attend(packed, k, v, cu_q, starts, used, G * ROWS_PER_READ, scale)
    else:
        out, lse = _efficient(packed, k, v, cu_q, starts, used, G * ROWS_PER_READ, max_k, scale, lse_at)
    merged = _merge_into_rows(out.reshape(P, G, Hkv, D), lse.reshape(P, G, Hkv), pairs[0], table)  # (R, G, Hkv, D)
    return merged.transpose(1, 2).reshape(R, 1, Hq * D)


def _attend_first(q, k, v, where: Where, scale) -> torch.Tensor:
    """A prefix's own tokens, nothing before them (one row): causal sdpa over the new K/V with
    cuDNN first (bench/probe-prefill-h100.json: 600-640 TFLOP/s at 16k-64k tokens on an H100,
    flash alone 300-340)."""
    R, Hq, T, D = q.shape
    (_, (own, n)), = where.host
    keys, values = k[own : own + n].transpose(0, 1)[None], v[own : own + n].transpose(0, 1)[None]
    with _prefill_kernels():
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(R, T, Hq * D)


def _prefill_kernels():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def _attend_suffix(q, k, v, where: Where, scale) -> torch.Tensor:
    """A question's suffix (T tokens per row): the whole prefix (one flash call) and the own
    region (causal, bottom-right aligned), merged."""
    R, Hq, T, D = q.shape
    packed = q.transpose(1, 2).reshape(R * T, Hq, D)
    cu_q = torch.arange(0, R * T + 1, T, dtype=torch.int32, device=q.device)
    parts = [_flash(packed, k, v, cu_q, starts, used, T, longest, causal, scale)
             for (starts, used, longest), causal in zip(where.segments(q.device), (False, True))]
    outs = torch.stack([o.reshape(R, T, Hq, D) for o, _ in parts], 1)
    lses = torch.stack([lse.reshape(R, T, Hq) for _, lse in parts], 1)
    return _merge(outs, lses).reshape(R, T, Hq * D)


def _attend_reference(q, k, v, where: Where, scale) -> torch.Tensor:
    """The same attention row by row with sdpa (CPU and fp32; tests compare it with model.generate)."""
    R, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    outs = []
    for r, ((p_start, p_n), (o_start, o_n)) in enumerate(where.host):
        keys = torch.cat([k[p_start : p_start + p_n], k[o_start : o_start + o_n]]).transpose(0, 1)[None]
        values = torch.cat([v[p_start : p_start + p_n], v[o_start : o_start + o_n]]).transpose(0, 1)[None]
        n = p_n + o_n
        visible = torch.arange(n, device=q.device)[None, :] <= torch.arange(n - T, n, device=q.device)[:, None]
        mask = visible[None, None, None].expand(1, 1, G, T, n).reshape(1, 1, G * T, n)
        out = F.scaled_dot_product_attention(q[r : r + 1].reshape(1, Hkv, G * T, D), keys, values, attn_mask=mask, scale=scale)
        outs.append(out.reshape(1, Hq, T, D))
    return torch.cat(outs).transpose(1, 2).reshape(R, T, Hq * D)


# -- decode steps -----------------------------------------------------------------------------


class Decoder:
    """One greedy decode step over `rows` decode positions: next tokens (EOS forbidden on forced
    rows). On the flash path (graphs=True) the step is captured once as a CUDA graph and
    replayed; its inputs are copied into static buffers first. Idle positions write the arena's
    scratch position and, on the flash path, read nothing."""

    SLOTS_PER_ROW = 8  # attention "sequences" (and pairs) per decode position: pieces of the rows' segments

    def __init__(self, model, arena: Arena, rows: int, max_k: int, eos_ids: list[int], graphs: bool):
        self.model, self.arena, self.rows, self.max_k = model, arena, rows, max_k
        device = arena.k[0].device
        S = rows * self.SLOTS_PER_ROW
        self.inputs = torch.zeros((3, rows), dtype=torch.long, device=device)  # tokens, rope positions, write index
        self.starts = torch.zeros(S + 1, dtype=torch.int32, device=device)
        self.used = torch.zeros(S, dtype=torch.int32, device=device)
        self.cu_pairs = torch.zeros(S + 1, dtype=torch.int32, device=device)
        self.pairs = torch.zeros((4, S), dtype=torch.long, device=device)
        self.forbid = torch.zeros(rows, dtype=torch.bool, device=device)
        self.eos = torch.tensor(eos_ids, device=device)
        self.graph = None
        self.graphs = graphs and arena.flash

    def _part(self, host: list) -> tuple:
        """The step as a forward_text part over the static buffers: (tokens, positions, where)."""
        tokens, positions, write = self.inputs
        plan = (self.starts, self.used, self.cu_pairs, self.pairs, self.max_k)
        return tokens[:, None], positions[:, None], Where(write[:, None], host, plan)

    def _step(self, host: list) -> torch.Tensor:
        return greedy(forward_text(self.model, self.arena, *self._part(host)), self.forbid, self.eos)

    def _capture(self, host: list) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (cuBLAS workspaces, allocator)
            self._step(host)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._step(host)

    def step(self, live: dict) -> list[int]:
        """live: decode position -> (last token, rope position, ((prefix start, length), (own start,
        length before the token)), forced). Appends each live row's token to its own region;
        returns every position's next token."""
        host = self._load(live)
        if not self.graphs:
            return self._step(host).tolist()
        if self.graph is None:
            self._capture(host)
        self.graph.replay()
        return self.out.tolist()

    def step_with(self, live: dict, part: tuple) -> tuple[torch.Tensor, list[int]]:
        """The same step inside the forward of `part` (a prefill chunk: forward_parts), eager:
        one pass over the weights for both. Returns (the part's logits, every position's next token)."""
        part_logits, logits = forward_parts(self.model, self.arena, [part, self._part(self._load(live))])
        return part_logits, greedy(logits, self.forbid, self.eos).tolist()

    def _load(self, live: dict) -> list:
        """Copy the step's inputs into the static buffers; returns the rows' segments (host)."""
        scratch = self.arena.scratch
        idle = (0, 0, ((scratch, 1), (scratch, 0)), False)
        cols = [live.get(i, idle) for i in range(self.rows)]
        host = [[pre, (own, n + 1)] for _, _, (pre, (own, n)), _ in cols]
        busy = [row if i in live else [] for i, row in enumerate(host)]
        starts, used, cu_pairs, pairs, _ = slots(busy, self.used.shape[0], scratch)
        write = [own + n for _, _, (_, (own, n)), _ in cols]
        self.inputs.copy_(torch.tensor([[c[0] for c in cols], [c[1] for c in cols], write]), non_blocking=True)
        self.starts.copy_(torch.tensor(starts, dtype=torch.int32), non_blocking=True)
        self.used.copy_(torch.tensor(used, dtype=torch.int32), non_blocking=True)
        self.cu_pairs.copy_(torch.tensor(cu_pairs, dtype=torch.int32), non_blocking=True)
        self.pairs.copy_(torch.tensor(pairs), non_blocking=True)
        self.forbid.copy_(torch.tensor([c[3] for c in cols]), non_blocking=True)
        return host


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

    def own(self, r: Row) -> int:
        """Arena positions of row r's own region: its suffix and its outputs."""
        return r.length - self.split + r.limit

    @property
    def positions(self) -> int:
        """Arena positions the group takes: its shared prefix once, each row's own region."""
        return self.split + sum(self.own(r) for r in self.rows)


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


def prefill_group(model, g: Group, device, kwarg: str, arena: Arena | None = None, regions: tuple | None = None):
    """Prefill the group's prefix once into its region of `arena` and each row's own suffix into
    the row's region. regions: (prefix start, [own start per row]).
    Returns (first-token logits of each row, the rope delta of the group)."""
    if arena is None:
        arena = Arena(model, g.positions)
        regions = (arena.take(g.split), [arena.take(g.own(r)) for r in g.rows])
    prefix, owns = regions
    inputs = _to_device(g.rows[0].prepared.inputs, model, device)
    if "pixel_values" in inputs:  # images: transformers' forward (vision tower, deepstack, 3-D rope)
        logits, cache, delta = prefill(model, inputs, g.split, kwarg)
        arena.load(prefix, cache, g.split)
        del cache
        return row_logits(model, g, device, arena, regions, delta, prefix_logits=logits), delta
    # text: straight into the arena (rope positions 0.., delta 0), prefix and suffixes in one forward
    return row_logits(model, g, device, arena, regions, 0, prefix_part=Chunks(g, regions, device, g.split).next()), 0


def row_logits(model, g: Group, device, arena: Arena, regions: tuple, delta: int, prefix_logits=None, prefix_part=None) -> list:
    """Each row's first-token logits: every row's own suffix (its question) into its region after
    the prefix, all in one forward (with `prefix_part`, the prefix's last part too: its K/V are
    written before any suffix reads them, layer by layer). A row without a suffix gets the
    prefix's own logits (`prefix_logits`, or those of `prefix_part`)."""
    prefix, owns = regions
    parts, has_suffix = [prefix_part] if prefix_part is not None else [], []
    for own, r in zip(owns, g.rows):
        ids = r.prepared.inputs["input_ids"][0]
        has_suffix.append(ids.numel() > g.split)
        if has_suffix[-1]:
            suffix = ids[g.split :].to(device)[None]
            positions = torch.arange(g.split, ids.numel(), device=device)[None] + delta
            parts.append((suffix, positions, Where.rows([((prefix, g.split), (own, 0))], suffix.shape[1], device)))
    logits = iter(forward_parts(model, arena, parts) if parts else [])
    if prefix_part is not None:
        prefix_logits = next(logits)
    return [next(logits) if suffix else prefix_logits for suffix in has_suffix]


class Chunks:
    """A text group's prefix as forward_text parts of at most `size` tokens: the first one plain
    causal attention, each later one the earlier ones in full and itself causally."""

    def __init__(self, g: Group, regions: tuple, device, size: int):
        self.g, self.regions, self.device, self.size = g, regions, device, size
        self.ids = g.rows[0].prepared.inputs["input_ids"][0, : g.split].to(device)
        self.done = 0

    def next(self, rest: bool = False) -> tuple:
        """(tokens, positions, where) of the next chunk (rest=True: all that is left)."""
        prefix, done = self.regions[0], self.done
        n = self.g.split - done if rest else min(self.size, self.g.split - done)
        self.done += n
        positions = torch.arange(done, done + n, device=self.device)[None]
        where = Where(positions + prefix, [[(prefix, done), (prefix + done, n)]], first=done == 0)
        return self.ids[done : done + n][None], positions, where

    @property
    def finished(self) -> bool:
        return self.done == self.g.split


def greedy(logits: torch.Tensor, forbid: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Argmax of each row; rows where `forbid` never pick EOS (like min_new_tokens in
    model.generate). Fixed shapes, no host sync: it runs inside the decode step's CUDA graph."""
    logits[:, eos] = torch.where(forbid[:, None], float("-inf"), logits[:, eos]).to(logits.dtype)
    return logits.argmax(-1)


# -- continuous batching ----------------------------------------------------------------------


class Batch:
    """What `run` serves: where its groups come from and where finished rows go. This one is a
    fixed batch (all groups at once, results read from the rows afterwards); a stream
    (qwen3vl.TransformersEngine.stream) hands out groups as jobs are claimed and reports each
    row as it stops."""

    def __init__(self, groups: list[Group]):
        self.groups = groups

    def more(self, idle: bool) -> list[Group] | None:
        """New groups ([] for none yet; with idle=True wait for some), None when there are no more."""
        groups, self.groups = self.groups, None
        return groups

    def started(self, group: Group) -> None:
        """The group was admitted: its prefill begins."""

    def finished(self, row: Row, group: Group) -> None:
        """Row stopped (its tokens are in row.ids)."""

    def too_large(self, group: Group, positions: int) -> None:
        raise torch.cuda.OutOfMemoryError(f"a group needs {group.positions} cache positions, {positions} fit in memory")

    def stopping(self) -> bool:
        """True once no more groups may start (the worker was asked to stop)."""
        return False

    def shared(self) -> bool:
        """Whether other workers take groups from the same queue (run paces long answers only then)."""
        return True

    def give_back(self, groups: list[Group]) -> None:
        """Groups that were waiting when `stopping` turned true: never started."""


def run(model, source: Batch, positions: int, rows: int, stopper: Stopper, eos_ids: list[int], device,
        kwarg: str, sync, graphs: bool, chunk: int | None = None, decode_share: float = 0.0) -> dict:
    """Run the groups of `source` through an arena of `positions` cache positions and `rows`
    decode positions. A group is admitted (prefilled) as soon as its rows find free decode
    positions and the arena a region for its prefix and one per row for the row's suffix and
    outputs; every live row decodes together; a stopped row frees its decode position and its
    region at once, the prefix region goes with the group's last row. Waiting groups are kept in
    planner.admission_order and topped up from `source` while fewer than `rows` wait; `source`
    hears of each group as it is admitted (`started`).
    chunk (tokens): while rows are live, a text prefix is prefilled `chunk` tokens at a time, each
    chunk in one forward with the next decode step (Decoder.step_with), so decoding goes on during
    prefills; None: each prefix at once, the decode steps waiting for it.
    decode_share (pacing): while a long answer (limit > LONG_ANSWER) is live and none waits, the
    next group is admitted only once the decode steps since have taken `decode_share` of the time
    the prefills before them took. A long answer's ~2,048 steps then run beside this worker's
    prefills instead of after its last one, so the queue's remaining jobs go to the other workers
    instead of all of them waiting for this one's tail; 0: one step between admissions. Only
    while `source.shared()`: a worker alone gains nothing from it and pays for more, emptier steps.
    Each row's `timing` gets its group's prefill time and its admission-to-stop time.
    Returns the figures: {"prefill_s", "decode_s", "steps", "mixed_steps", "rows", "positions", "most_live", "seconds",
    "tail_steps", "tail_s"}; the tail is what ran after the last prefill (decode steps alone)."""
    sync()
    start = time.perf_counter()
    arena = Arena(model, positions)
    decoder = Decoder(model, arena, rows, positions, eos_ids, graphs)
    pending, free, live = [], list(range(rows))[::-1], {}  # live: decode position -> (row, region, group)
    holders: dict[int, list] = {}  # id(group) -> [prefix start, rows still live]
    prefill_s = steps = mixed = most = n = 0
    last_prefill = (0, start)  # (steps, time) when the last prefill ended
    exhausted = False
    filling = None  # (Chunks, decode positions kept for its rows, t0): the group being prefilled beside steps
    owed = 0.0  # decode seconds owed to the live long answers (decode_share of the prefill time since)

    def long_live() -> bool:
        return any(r.limit > LONG_ANSWER for r, *_ in live.values())

    def paced() -> bool:
        """Hold admissions: decode time is owed, a long answer is live, none waits, and other
        workers share the queue (alone, pacing only adds steps)."""
        return owed > 0 and long_live() and max(r.limit for r in pending[0].rows) <= LONG_ANSWER and source.shared()

    def release(r: Row, own: int, g: Group) -> None:
        arena.give(own, g.own(r))
        holder = holders[id(g)]
        holder[1] -= 1
        if not holder[1]:
            arena.give(holder[0], g.split)
            del holders[id(g)]
        source.finished(r, g)

    def admit(g: Group, owns: list, logits: list, delta: int, t0: float, kept: list, waited_from: float) -> None:
        """The group's first tokens: its rows go live on the decode positions `kept` (or stop).
        prefill_s counts the time from `waited_from` (decode steps beside chunks are steps)."""
        nonlocal prefill_s, last_prefill
        forced = torch.tensor([r.forced for r in g.rows], device=device)
        firsts = greedy(torch.cat(logits), forced, decoder.eos).tolist()
        t1 = time.perf_counter()  # the token list above waited for the prefill
        prefill_s += t1 - waited_from
        last_prefill = (steps, t1)
        for own, r, token, i in zip(owns, g.rows, firsts, kept):
            r.timing.update(prefill_s=t1 - t0, admitted=t0)
            stopper.push(r, token)
            if r.done:
                r.timing["seconds"] = time.perf_counter() - t0
                free.append(i)
                release(r, own, g)
            else:
                live[i] = (r, own, g, delta)

    def finish_filling(waited_from: float, **prefix) -> None:
        """The chunked group's prefix is in (or its last part goes with the suffixes): its
        suffixes, then its first tokens. prefix: row_logits' prefix_logits or prefix_part."""
        nonlocal filling
        (chunks, kept, t0), filling = filling, None
        logits = row_logits(model, chunks.g, device, arena, chunks.regions, 0, **prefix)
        admit(chunks.g, chunks.regions[1], logits, 0, t0, kept, waited_from)

    while True:
        if not exhausted and len(pending) < rows:
            new = source.more(idle=not (pending or live or filling))
            exhausted = new is None
            for g in planner.split_large(new or [], rows, positions):
                if g.positions > positions:
                    source.too_large(g, positions)
                else:
                    pending.append(g)
            pending = planner.admission_order(pending)
        if source.stopping():
            source.give_back(pending)
            pending, exhausted = [], True
        if not (pending or live or filling):
            if exhausted:
                break
            continue
        while filling is None and pending and len(pending[0].rows) <= len(free) and not paced():
            g = pending[0]
            taken = arena.take_all([g.split] + [g.own(r) for r in g.rows])
            if taken is None:  # memory is full until live rows stop
                break
            pending.pop(0)
            source.started(g)
            n += len(g.rows)
            prefix, owns = taken[0], taken[1:]
            holders[id(g)] = [prefix, len(g.rows)]
            kept = [free.pop() for _ in g.rows]
            t0 = time.perf_counter()
            if chunk and live and "pixel_values" not in g.rows[0].prepared.inputs:
                filling = (Chunks(g, (prefix, owns), device, chunk), kept, t0)
                break
            admit(g, owns, *prefill_group(model, g, device, kwarg, arena, (prefix, owns)), t0, kept, t0)
            owed += decode_share * (time.perf_counter() - t0)
        if filling is not None and not live:  # nothing to decode beside it: the rest at once
            waited_from = time.perf_counter()
            finish_filling(waited_from, prefix_part=filling[0].next(rest=True))
        if not live:  # an empty arena holds any group that passed too_large
            continue
        step = {i: (r.ids[-1], r.length + len(r.ids) - 1 + delta,
                    ((holders[id(g)][0], g.split), (own, r.length - g.split + len(r.ids) - 1)), r.forced)
                for i, (r, own, g, delta) in live.items()}
        t_step = time.perf_counter()
        if filling is not None:
            chunk_logits, next_tokens = decoder.step_with(step, filling[0].next())
            mixed += 1
        else:
            next_tokens = decoder.step(step)
        steps, most = steps + 1, max(most, len(live))
        now = time.perf_counter()
        owed -= now - t_step
        for i, (r, own, g, _) in list(live.items()):
            stopper.push(r, next_tokens[i])
            if r.done:
                del live[i]
                free.append(i)
                r.timing["seconds"] = now - r.timing["admitted"]
                release(r, own, g)
        if filling is not None and filling[0].finished:
            finish_filling(time.perf_counter(), prefix_logits=chunk_logits)
        if not long_live():
            owed = 0.0  # pacing starts afresh with the next long answer
    sync()
    end = time.perf_counter()
    wall, tail_steps, tail_s = end - start, steps - last_prefill[0], end - last_prefill[1]
    log.info("decode: %d rows, %d positions, up to %d of %d rows live, prefill %.2f s, %d steps (%d beside prefill chunks, "
             "%d in %.2f s after the last prefill), %.2f s in all%s", n, positions, most, rows, prefill_s, steps, mixed,
             tail_steps, tail_s, wall, ", CUDA graph" if decoder.graphs else "")
    return {"prefill_s": prefill_s, "decode_s": wall - prefill_s, "steps": steps, "mixed_steps": mixed, "rows": n,
            "positions": positions, "most_live": most, "seconds": wall, "tail_steps": tail_steps, "tail_s": tail_s}
