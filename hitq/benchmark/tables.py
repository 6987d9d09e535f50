"""Where each input file lives, reading tables the way the predecessor did, and checking that
inputs exist and are not Git LFS pointers (the shared copy ships every PNG as a pointer).

Paths: `<data>/<format>/<FileName>.<ext>` (ext from query.EXTENSIONS), `<data>/image/<FileName>.png`,
`<data>/tables/<FileName>.xlsx` (read only when scoring Visualization code).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from hitq.benchmark.query import EXTENSIONS, FORMATS, Query
from hitq.errors import MissingInput, UsageError

LFS_MAGIC = b"version https://git-lfs"


def table_path(data_dir: str | Path, fmt: str, file_name: str) -> Path:
    if fmt not in EXTENSIONS:
        raise UsageError(f"unknown table format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return Path(data_dir) / fmt / f"{file_name}.{EXTENSIONS[fmt]}"


def image_path(data_dir: str | Path, file_name: str) -> Path:
    return Path(data_dir) / "image" / f"{file_name}.png"


def xlsx_path(data_dir: str | Path, file_name: str) -> Path:
    return Path(data_dir) / "tables" / f"{file_name}.xlsx"


def is_lfs_pointer(path: str | Path) -> bool:
    """True when the file is a Git LFS pointer text instead of the real content."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(LFS_MAGIC)) == LFS_MAGIC
    except OSError:
        return False


def lfs_real_size(path: str | Path) -> int | None:
    """The `size N` a pointer file records (the real file's byte size), if readable."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("size ") and line[5:].strip().isdigit():
            return int(line[5:].strip())
    return None


def problem(path: Path) -> str | None:
    """`"missing"`, `"lfs_pointer"` or None when the file is usable."""
    if not path.is_file():
        return "missing"
    if is_lfs_pointer(path):
        return "lfs_pointer"
    return None


def _check(path: Path, what: str) -> None:
    kind = problem(path)
    if kind == "missing":
        raise MissingInput(f"{what} {path.name} is missing: {path}")
    if kind == "lfs_pointer":
        size = lfs_real_size(path)
        real = f"real size {size} bytes" if size is not None else "real size unknown"
        raise MissingInput(f"{what} {path.name} is a Git LFS pointer ({real}), not the {what.split()[-1]}: {path}")


def read_table(data_dir: str | Path, fmt: str, file_name: str) -> str:
    """The table text exactly as the official and predecessor code read it: UTF-8 with
    undecodable bytes dropped, universal newlines, a leading BOM kept as U+FEFF."""
    path = table_path(data_dir, fmt, file_name)
    _check(path, f"{fmt} table")
    with open(path, encoding="utf-8", errors="ignore") as fh:
        return fh.read()


def check_image(data_dir: str | Path, file_name: str) -> Path:
    """The image's path; MissingInput when it is absent or an LFS pointer."""
    path = image_path(data_dir, file_name)
    _check(path, "image")
    return path


def needed_inputs(modality: str, fmt: str, protocol: str = "corrected") -> list[str]:
    """Input kinds a prompt needs: a table format and/or "image". The official image protocol
    also inserts the text table (realhitbench.md section d)."""
    if modality == "text":
        return [fmt]
    if modality == "mix" or (modality == "image" and protocol == "official"):
        return [fmt, "image"]
    if modality == "image":
        return ["image"]
    raise UsageError(f"unknown modality {modality!r}; choose one of: text, image, mix")


def validate_inputs(
    data_dir: str | Path, queries: Iterable[Query], modality: str, fmt: str, protocol: str = "corrected"
) -> dict[str, dict[str, dict]]:
    """Unusable input files of these queries, per input kind (the format name and/or "image"):
    `{kind: {file_name: {"problem": "missing"|"lfs_pointer", "path": str, "real_bytes": int|None,
    "ids": [query ids]}}}`. Kinds without problems map to `{}`. Each file is checked once."""
    kinds = needed_inputs(modality, fmt, protocol)
    report: dict[str, dict[str, dict]] = {k: {} for k in kinds}
    checked: dict[tuple[str, str], str | None] = {}
    for q in queries:
        for kind in kinds:
            path = image_path(data_dir, q.file_name) if kind == "image" else table_path(data_dir, kind, q.file_name)
            key = (kind, q.file_name)
            if key not in checked:
                checked[key] = problem(path)
                if checked[key]:
                    report[kind][q.file_name] = {
                        "problem": checked[key],
                        "path": str(path),
                        "real_bytes": lfs_real_size(path) if checked[key] == "lfs_pointer" else None,
                        "ids": [],
                    }
            if checked[key]:
                report[kind][q.file_name]["ids"].append(q.id)
    return report


def bad_ids(report: dict[str, dict[str, dict]]) -> set[int]:
    """Every query id that `validate_inputs` found an unusable input for."""
    return {i for files in report.values() for entry in files.values() for i in entry["ids"]}
