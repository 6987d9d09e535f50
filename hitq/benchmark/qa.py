"""Load RealHiTBench QA files into `Query` objects and select subsets of them.

Structure Comprehending (SC) rows in `QA_final.json` have empty answers and name the
unswapped table. With `sc_protocol="gold"` they are derived at load time exactly as
`QA_final_sc_filled.json` was made (realhitbench.md section c): the SC question is a verbatim
copy of a non-SC "twin" question on the same table; the SC row gets `FileName + "_swap"` and the
twin's FinalAnswer/ProcessedAnswer. Rows that are already filled (a `_swap` file name) are kept,
so loading either file gives identical queries.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from hitq.benchmark.query import Query
from hitq.errors import DataError, UsageError

SC_TYPE = "Structure Comprehending"
SC_PROTOCOLS = ("gold", "none")
# Keys every row must have, with their type; COT, Source, CompStrucCata are not used by hitq.
REQUIRED_KEYS: dict[str, type] = {
    "id": int,
    "FileName": str,
    "Question": str,
    "QuestionType": str,
    "SubQType": str,
    "FinalAnswer": str,
    "ProcessedAnswer": str,
}


def load_queries(data_dir: str, qa_file: str | None = None, sc_protocol: str = "gold") -> list[Query]:
    """Read, validate and convert a QA file; `qa_file` defaults to `QA_final.json` and a relative
    name resolves against `data_dir`. Raises DataError (one line) on any problem."""
    if sc_protocol not in SC_PROTOCOLS:
        raise UsageError(f"unknown SC protocol {sc_protocol!r}; choose one of: {', '.join(SC_PROTOCOLS)}")
    rows = _read_rows(data_dir, qa_file)
    if sc_protocol == "gold":
        rows = derive_sc(rows)
    return [_to_query(r) for r in rows]


def _read_rows(data_dir: str, qa_file: str | None) -> list[dict]:
    base = Path(data_dir).expanduser()
    if not base.is_dir():
        raise DataError(f"dataset directory not found: {base}")
    path = Path(qa_file or "QA_final.json").expanduser()
    if not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise DataError(f"QA file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"QA file is not valid JSON: {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("queries"), list):
        raise DataError(f'QA file has no "queries" list: {path}')
    rows = data["queries"]
    seen: set[int] = set()
    for pos, row in enumerate(rows):
        _check_row(row, pos, path)
        if row["id"] in seen:
            raise DataError(f"QA file has duplicate id {row['id']}: {path}")
        seen.add(row["id"])
    return rows


MAX_FILE_NAME = 200  # characters; file systems allow 255 bytes for <name>.<ext>


def _check_row(row: object, pos: int, path: Path) -> None:
    if not isinstance(row, dict):
        raise DataError(f"QA row {pos} is not an object: {path}")
    where = f"QA row {pos} (id {row.get('id')!r})"
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        raise DataError(f"{where} lacks key(s) {', '.join(missing)}: {path}")
    for key, typ in REQUIRED_KEYS.items():
        value = row[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise DataError(f"{where}: {key} must be {typ.__name__}, got {type(value).__name__}: {path}")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate from a JSON \ud800 escape
                raise DataError(f"{where}: {key} holds text that is not valid Unicode ({e.reason}): {path}") from None
    name = row["FileName"]
    if not name or len(name) > MAX_FILE_NAME or any(c in name for c in "/\\\0") or name in (".", ".."):
        raise DataError(f"{where}: FileName {name[:60]!r} is not a table name (empty, too long or a path): {path}")


def derive_sc(rows: list[dict]) -> list[dict]:
    """Return new rows with unfilled SC rows filled from their twins (input rows untouched)."""
    twin: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r["QuestionType"] != SC_TYPE:
            twin.setdefault((r["FileName"], r["Question"]), r)  # exact match, no strip
    out = []
    for r in rows:
        if r["QuestionType"] == SC_TYPE and not r["FileName"].endswith("_swap"):
            t = twin.get((r["FileName"], r["Question"]))
            if t is None:
                raise DataError(
                    f"Structure Comprehending row id {r['id']} has no non-SC row with the same "
                    f"FileName and Question to take its answer from (use --sc-protocol none)"
                )
            r = {**r, "FileName": r["FileName"] + "_swap",
                 "FinalAnswer": t["FinalAnswer"], "ProcessedAnswer": t["ProcessedAnswer"]}
        out.append(r)
    return out


def _to_query(r: dict) -> Query:
    visual = r["QuestionType"] == "Visualization"
    return Query(
        id=r["id"],
        file_name=r["FileName"],
        question_type=r["QuestionType"],
        sub_q_type=r["SubQType"],
        question=r["Question"],
        reference=r["ProcessedAnswer"] if visual else r["FinalAnswer"],
        final_answer=r["FinalAnswer"],
        processed_answer=r["ProcessedAnswer"],
    )


_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_ids(spec: str) -> set[int]:
    """`"1-40,2747"` -> {1..40, 2747}. Raises UsageError on anything else."""
    ids: set[int] = set()
    parts = spec.split(",")
    for part in parts:
        m = _RANGE.match(part)
        if not m:
            raise UsageError(f"bad id spec {spec!r}: {part.strip()!r} is not N or N-M (example: 1-40,2747)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise UsageError(f"bad id spec {spec!r}: range {lo}-{hi} is reversed")
        ids.update(range(lo, hi + 1))
    return ids


def select(queries: Iterable[Query], ids: set[int] | None = None, types: list[str] | None = None) -> list[Query]:
    """Queries whose id is in `ids` (if given) and whose QuestionType or SubQType is one of
    `types` (if given; case-insensitive). Unknown type names raise UsageError."""
    queries = list(queries)
    if types:
        valid = sorted({q.question_type for q in queries} | {q.sub_q_type for q in queries if q.sub_q_type})
        lowered = {v.lower(): v for v in valid}
        unknown = [t for t in types if t.strip().lower() not in lowered]
        if unknown:
            raise UsageError(f"unknown question type(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
        wanted = {lowered[t.strip().lower()] for t in types}
        queries = [q for q in queries if q.question_type in wanted or q.sub_q_type in wanted]
    if ids is not None:
        queries = [q for q in queries if q.id in ids]
    return queries
