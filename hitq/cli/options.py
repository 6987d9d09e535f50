"""Options shared by several commands, and parsers for the values users type."""
from __future__ import annotations

import re

import click

from hitq.errors import UsageError

db_option = click.option(
    "--db", "db", envvar="HITQ_DB", show_envvar=True, default="sqlite:///hitq.db", show_default=True,
    help="Database URL (sqlite:///FILE, a file path, or postgresql://user:pass@host/db).",
)
run_option = click.option("--run", "run_name", default=None, help="Run name (default: the only run, or the newest).")


def parse_devices(spec: str) -> list[str]:
    """`0..3` → 0,1,2,3; `0,2` → 0,2; `cpu` → cpu. Device ids are CUDA indices."""
    spec = spec.strip().lower()
    if spec == "cpu":
        return ["cpu"]
    m = re.fullmatch(r"(\d+)\.\.(\d+)", spec)
    if m:
        lo, hi = int(m[1]), int(m[2])
        if lo > hi:
            raise UsageError(f"bad --gpu {spec!r}: the range {lo}..{hi} is empty")
        return [str(i) for i in range(lo, hi + 1)]
    if re.fullmatch(r"\d+(,\d+)*", spec):
        ids = spec.split(",")
        if len(set(ids)) != len(ids):
            raise UsageError(f"bad --gpu {spec!r}: a device is listed twice")
        return ids
    raise UsageError(f"bad --gpu {spec!r}: use a range like 0..3, a list like 0,2, or cpu")


def parse_engine_opts(items: tuple[str, ...]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"bad --engine-opt {item!r}: use KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out
