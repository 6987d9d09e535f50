"""Render a table to a PNG with Pillow: a grid of cells with their text.

A test/demo utility: the shared dataset copy ships every PNG as a Git LFS pointer, so image and
mix runs on it (tests, `hitq demo`, benchmarks) need stand-in images. These are not the
benchmark's images and results on them are not comparable with published ones.
Output is deterministic (same input, same bytes) and capped in size.
"""
from __future__ import annotations

import csv
import html
import io
import json
import re
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from hitq.benchmark import tables

MAX_ROWS = 120
MAX_COLS = 30
MAX_CELL_CHARS = 40
MAX_SIDE = 4000  # pixels, after scaling
PAD = 4


def parse_rows(text: str, fmt: str) -> list[list[str]]:
    """Cell texts row by row (good enough for drawing, not a faithful parser)."""
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(text)))
    elif fmt == "html":
        rows = [[_clean(c) for c in re.findall(r"<t[dh]\b[^>]*>(.*?)</t[dh]>", tr, re.S | re.I)]
                for tr in re.findall(r"<tr\b.*?</tr>", text, re.S | re.I)]
    elif fmt == "markdown":
        rows = [[c.strip() for c in line.strip().strip("|").split("|")]
                for line in text.splitlines() if line.lstrip().startswith("|") and not re.fullmatch(r"[\s|:\-]+", line)]
    elif fmt == "json":
        rows = [["" if v is None else str(v) for v in item.values()] for item in json.loads(text) if isinstance(item, dict)]
    else:  # latex and anything else: split rows on \\ and cells on &
        body = text.split("\\begin{tabular", 1)[-1]
        rows = [[re.sub(r"\\[a-zA-Z]+(\{[^}]*\})*|[{}]", " ", c).strip() for c in r.split("&")] for r in body.split("\\\\")]
    return _trim(rows)


def _clean(cell: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", cell)).split())


def _trim(rows: list[list[str]]) -> list[list[str]]:
    """Drop empty rows and the empty padding columns on the right; cap rows, columns, cell text."""
    rows = [[" ".join(c.split())[:MAX_CELL_CHARS] for c in r] for r in rows if any(c.strip() for c in r)]
    width = max((i + 1 for r in rows for i, c in enumerate(r) if c), default=0)
    return [(r + [""] * width)[:min(width, MAX_COLS)] for r in rows[:MAX_ROWS]]


def render_table_png(table: str | Path, fmt: str, out_path: str | Path, scale: float = 1.0) -> Path:
    """Draw `table` (text, or a path to a table file) as a grid PNG at `out_path`."""
    text = Path(table).read_text(encoding="utf-8", errors="ignore") if isinstance(table, Path) else table
    rows = parse_rows(text, fmt) or [["(empty table)"]]
    font = ImageFont.load_default(size=max(8, round(12 * scale)))
    widths = [max(font.getlength(r[i]) for r in rows) + 2 * PAD for i in range(len(rows[0]))]
    line = round(16 * scale) + 2 * PAD
    width, height = int(sum(widths)) + 1, line * len(rows) + 1
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for r, row in enumerate(rows):
        y = r * line
        if r == 0:
            draw.rectangle([0, 0, width - 1, line], fill=(230, 236, 245))
        x = 0.0
        for c, cell in enumerate(row):
            draw.rectangle([int(x), y, int(x + widths[c]), y + line], outline=(150, 150, 150))
            draw.text((int(x) + PAD, y + PAD), cell, fill="black", font=font)
            x += widths[c]
    if max(image.size) > MAX_SIDE:
        factor = MAX_SIDE / max(image.size)
        image = image.resize((max(1, int(width * factor)), max(1, int(height * factor))), Image.LANCZOS)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG", optimize=False)
    return out


def ensure_images(data_dir: str | Path, file_names: Iterable[str], fmt_source: str = "csv") -> list[Path]:
    """Write `<data_dir>/image/<name>.png` from the `fmt_source` table (html as a second choice)
    wherever the PNG is missing or an LFS pointer; returns the paths written. Test/demo use only:
    it replaces pointer files inside the dataset directory."""
    written = []
    for name in sorted(set(file_names)):
        target = tables.image_path(data_dir, name)
        if tables.problem(target) is None:
            continue
        for fmt in dict.fromkeys((fmt_source, "html")):
            source = tables.table_path(data_dir, fmt, name)
            if tables.problem(source) is None:
                written.append(render_table_png(tables.read_table(data_dir, fmt, name), fmt, target))
                break
    return written
