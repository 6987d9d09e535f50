"""Pools of cache slots under a memory budget: which requests share one static KV cache.

A pool of S slots with capacity C (the longest prompt + output limit among its requests)
allocates S x C cache positions, and its prefills need a workspace that grows with the longest
prompt (activations and the prefix's own DynamicCache). Requests are sorted by what they need
(prompt + limit); a pool takes the longest remaining ones and every shorter one that is at
least half as long, or that still finds a free slot at once, so a slot's capacity is not mostly
padding. Inside a pool, groups are admitted longest output cap first (chart answers start early
and the short answers fill the slots around them). S x C x kv_bytes + workspace stays under the
device's free memory: the OOM ladder is the exception, not the schedule.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Budget:
    """What one pool may use."""

    bytes: int  # device memory free for the cache and the prefill workspace
    kv_per_token: int  # bytes of K+V per cache position (all layers)
    workspace_per_token: int  # prefill activations + the prefix's DynamicCache, per prompt token
    max_rows: int = 64

    def slots(self, capacity: int, longest: int) -> int:
        """Slots of `capacity` positions that fit beside the prefill workspace of `longest` tokens (>= 1)."""
        free = self.bytes - longest * self.workspace_per_token
        return max(1, min(self.max_rows, free // max(1, capacity * self.kv_per_token)))


def _cap(g) -> int:
    return max(r.prepared.max_new_tokens for r in g.rows)


def pools(groups: Sequence, budget: Budget) -> list[tuple[list, int]]:
    """Split `groups` (fastgen.Group: rows, need, longest) into pools: [(groups in admission
    order, slots)]. A group larger than its pool's slots is cut into parts that fit (each part
    prefills the shared prefix once)."""
    order = sorted(groups, key=lambda g: -g.need)
    out: list[tuple[list, int]] = []
    current: list = []
    for g in order:
        if current:
            capacity = current[0].need
            slots = budget.slots(capacity, max(x.longest for x in current + [g]))
            rows = sum(len(x.rows) for x in current) + len(g.rows)
            if 2 * g.need <= capacity and rows > slots:
                out.append(_close(current, budget))
                current = []
        current.append(g)
    if current:
        out.append(_close(current, budget))
    return out


def _close(groups: list, budget: Budget) -> tuple[list, int]:
    slots = min(budget.slots(groups[0].need, max(g.longest for g in groups)), sum(len(g.rows) for g in groups))
    parts = []
    for g in groups:
        parts += [replace(g, rows=g.rows[i : i + slots]) for i in range(0, len(g.rows), slots)] if len(g.rows) > slots else [g]
    return sorted(parts, key=lambda g: (-_cap(g), -g.need)), slots


def device_budget(model, device, max_rows: int, kv_budget_tokens: int | None = None, margin: float = 0.9) -> Budget:
    """The budget from the device's free memory (CUDA) or from `kv_budget_tokens` (CPU, tests)."""
    import torch

    from hitq.engine.fastgen import kv_bytes_per_token

    c = model.config.text_config
    kv = kv_bytes_per_token(model)
    act = model.dtype.itemsize * (6 * c.hidden_size + 3 * c.intermediate_size)
    if kv_budget_tokens is not None:
        return Budget(kv_budget_tokens * kv, kv, 0, max_rows)
    if device.type != "cuda":
        return Budget(1 << 36, kv, kv + act, max_rows)
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return Budget(int((free + cached) * margin) - (1 << 30), kv, kv + act, max_rows)
