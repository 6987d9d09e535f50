"""How much KV cache a fast-path call may take, and in which order its groups are admitted.

The arena (hitq.engine.fastgen.Arena) holds each live group's shared prefix once and each of its
requests' suffix + output limit; it gets the device's free memory less the prefill workspace of the
longest prompt (activations, and with images the prefix's own DynamicCache), so the OOM
ladder is the exception, not the schedule. Groups are admitted longest output limit first (chart
answers start early and the short answers fill the decode rows around them), then largest need
first (large regions before the arena fragments).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Budget:
    """What one call may use."""

    bytes: int  # device memory free for the cache and the prefill workspace
    kv_per_token: int  # bytes of K+V per cache position (all layers)
    workspace_per_token: int  # prefill activations (+ the prefix's DynamicCache with images), per prompt token
    max_rows: int = 64  # decode rows (requests decoding together)

    def positions(self, longest: int) -> int:
        """Cache positions that fit beside the prefill workspace of a `longest`-token prompt."""
        return max(0, (self.bytes - longest * self.workspace_per_token) // max(1, self.kv_per_token))


def admission_order(groups: Sequence) -> list:
    """Longest output limit first, then largest need (fastgen.Group: rows, need): the rows that
    decode longest start first, and the last ones admitted leave a short tail."""
    return sorted(groups, key=lambda g: (-max(r.limit for r in g.rows), -g.need))


def split_large(groups: Sequence, rows: int, positions: int) -> list:
    """Cut a group into parts of at most `rows` rows that fit in `positions` together: the
    shared prefix (`split`) once plus each row's suffix and outputs (each part prefills the
    prefix). A single row larger than `positions` stays: fastgen.run reports it as out of memory."""
    out = []
    for g in groups:
        part: list = []
        for r in g.rows:
            if part and (len(part) == rows or g.split + sum(map(g.own, part + [r])) > positions):
                out.append(replace(g, rows=part))
                part = []
            part.append(r)
        out.append(replace(g, rows=part) if len(part) < len(g.rows) else g)
    return out


def device_budget(model, device, max_rows: int, kv_budget_tokens: int | None = None, images: bool = True,
                  margin: float = 0.85) -> Budget:
    """The budget from the device's free memory (CUDA) or from `kv_budget_tokens` (CPU, tests).
    With images a prefix is prefilled by transformers into a DynamicCache that is then copied
    to the arena, so its workspace holds a second KV copy; text prefixes go straight in."""
    import torch

    from hitq.engine.fastgen import kv_bytes_per_token

    c = model.config.text_config
    kv = kv_bytes_per_token(model)
    act = model.dtype.itemsize * (6 * c.hidden_size + 3 * c.intermediate_size)
    if kv_budget_tokens is not None:
        return Budget(kv_budget_tokens * kv, kv, 0, max_rows)
    workspace = act + (kv if images else 0)
    if device.type != "cuda":  # CPU runs are tests and demos on the tiny model: 1 GiB of cache
        return Budget(1 << 30, kv, workspace, max_rows)
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return Budget(int((free + cached) * margin) - (1 << 30), kv, workspace, max_rows)
