"""Decode batches under a memory budget: which groups of requests share one static KV cache.

A decode batch of R rows allocates R x capacity cache positions (capacity = longest prompt +
largest output limit of the batch), and its prefills need a workspace that grows with the
longest prompt (activations and the prefix's own KV). The planner packs groups, sorted by
output limit then prompt length (so rows of a batch end together and pad little), while
R x capacity x kv_bytes + workspace(longest) stays under the free device memory: the OOM ladder
is the exception, not the schedule.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """What one decode batch may use."""

    bytes: int  # device memory free for the cache and the prefill workspace
    kv_per_token: int  # bytes of K+V per cache position (all layers)
    workspace_per_token: int  # prefill activations + the prefix's DynamicCache, per prompt token
    max_rows: int = 64

    def fits(self, rows: int, capacity: int, longest: int) -> bool:
        return rows * capacity * self.kv_per_token + longest * self.workspace_per_token <= self.bytes


def plan(groups: Sequence, budget: Budget, length: Callable, limit: Callable, cap: Callable) -> list[list]:
    """Pack `groups` into decode batches. length(g): longest prompt; limit(g): largest output
    limit (cache size); cap(g): the output cap used to sort (the question type's budget, never
    a forced length). A group that does not fit alone still gets a batch of its own."""
    order = sorted(groups, key=lambda g: (-cap(g), -length(g)))
    batches: list[list] = []
    current: list = []
    for g in order:
        candidate = current + [g]
        rows = sum(len(x.rows) for x in candidate)
        longest = max(length(x) for x in candidate)
        capacity = longest + max(limit(x) for x in candidate)
        if current and (rows > budget.max_rows or not budget.fits(rows, capacity, longest)):
            batches.append(current)
            candidate = [g]
        current = candidate
    if current:
        batches.append(current)
    return batches


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
