"""Load answers from any file layout into plain row dicts.

Accepted layouts (docs/realhitbench.md e):

* predecessor final results: ``{"config": {...}, "aggregate_metrics": {...}, "results": [row, ...]}``
* predecessor checkpoint: ``{"results": [row, ...], "processed_ids": [...]}``
* hitq export: ``{"run": {...}, "rows": [row, ...]}`` or a bare list of rows (JSON or JSON lines)

Every row becomes a dict with at least ``id, FileName, QuestionType, SubQType, Question, Reference,
Prediction, status`` (``"done"`` or ``"error"``), ``error_kind``, ``input_tokens``,
``processing_time`` and ``truncated``. Predecessor ``[ERROR] ...`` predictions become error rows;
the text stays in ``Prediction`` because the official protocol scores it as a (wrong) answer.
Rows are returned sorted by id: the official chart loop ran in id order, which matters for its
leaked figure state.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hitq.errors import DataError, NotFound

_QUEUE_KEYS = {"file_name": "FileName", "question_type": "QuestionType", "sub_q_type": "SubQType",
               "question": "Question", "reference": "Reference", "prediction": "Prediction"}
_ERROR_KINDS = (
    ("OOM", "oom"),
    ("Failed to get proper final answer format", "bad_format"),
    ("decompression bomb", "bad_input"),
    ("not found", "missing_input"),
)


def error_kind_of(prediction: str) -> str:
    """Map a predecessor ``[ERROR] ...`` string onto hitq's job error kinds."""
    low = prediction.lower()
    for needle, kind in _ERROR_KINDS:
        if needle.lower() in low:
            return kind
    return "engine_error"


def normalize_row(raw: dict[str, Any]) -> dict[str, Any]:
    """One predecessor or hitq row -> the evaluation row model."""
    row = dict(raw)
    if "query_id" in row:  # a job-queue row: `id` is the job's key, the query is `query_id`
        row["job_id"] = row.get("id")
        row["id"] = row["query_id"]
        for db_key, key in _QUEUE_KEYS.items():
            if key not in row and db_key in row:
                row[key] = row[db_key]
        if row.get("status") not in ("done", "error"):  # pending/running/...: no answer yet
            row["error_kind"] = row.get("error_kind") or f"not_finished ({row.get('status')})"
            row["status"] = "error"
        elif row["status"] == "error" and not row.get("Prediction"):
            row["Prediction"] = f"[ERROR] {row.get('error_message') or row.get('error_kind') or ''}"
    row["id"] = int(row.get("id", row.get("Id", 0)))
    for key in ("FileName", "QuestionType", "SubQType", "Question", "Reference", "Prediction"):
        value = row.get(key)
        row[key] = "" if value is None else str(value)
    prediction = row["Prediction"]
    status = row.get("status") or ("error" if prediction.lstrip().startswith("[ERROR") else "done")
    row["status"] = status
    if status == "error" and not row.get("error_kind"):
        row["error_kind"] = error_kind_of(prediction)
    row.setdefault("error_kind", None)
    if row.get("processing_time") is None and row.get("ProcessingTime") is not None:
        row["processing_time"] = float(row["ProcessingTime"])
    row.setdefault("processing_time", None)
    row.setdefault("input_tokens", None)
    row.setdefault("truncated", None)
    return row


def _rows_and_meta(data: Any) -> tuple[list[dict], dict]:
    if isinstance(data, list):
        return data, {}
    if isinstance(data, dict):
        meta = dict(data.get("config") or data.get("run") or {})
        if isinstance(meta.get("config"), dict):  # hitq export: {"run": {"name":.., "config": {...}}}
            meta = {**meta["config"], **{k: v for k, v in meta.items() if k != "config"}}
        for key in ("results", "rows"):
            if isinstance(data.get(key), list):
                return data[key], meta
    raise DataError("unrecognised predictions file: expected a results/checkpoint/export JSON")


def load_predictions(path: str | Path) -> tuple[list[dict], dict]:
    """Read a predictions file; returns (rows sorted by id, metadata such as modality/format)."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"predictions file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not JSON or JSON lines ({exc})") from None
    raw_rows, meta = _rows_and_meta(data)
    by_id: dict[int, dict] = {}
    for raw in raw_rows:
        if not isinstance(raw, dict):
            raise DataError(f"{path}: rows must be JSON objects")
        row = normalize_row(raw)
        by_id[row["id"]] = row  # a later duplicate (resume artefact) wins
    meta.setdefault("name", _default_name(path, meta))
    return [by_id[i] for i in sorted(by_id)], meta


def _default_name(path: Path, meta: dict) -> str:
    if meta.get("modality") and meta.get("format"):
        return f"{meta['modality']}_{meta['format']}"
    return path.parent.name or path.stem


def fill_references(rows: list[dict], data_dir: str | Path | None) -> None:
    """Fill missing ``Reference`` (and other fields) from the dataset's QA files, in place.

    Visualization takes ``ProcessedAnswer``; a Structure Comprehending row on a ``_swap`` table takes
    the filled answer of ``QA_final_sc_filled.json`` (the predecessor's protocol).
    """
    if data_dir is None or all(r.get("Reference") for r in rows):
        return
    data_dir = Path(data_dir)
    queries: dict[str, dict[int, dict]] = {}
    for name in ("QA_final.json", "QA_final_sc_filled.json"):
        p = data_dir / name
        if p.is_file():
            queries[name] = {q["id"]: q for q in json.loads(p.read_text(encoding="utf-8"))["queries"]}
    if not queries:
        raise DataError(f"no QA_final.json in {data_dir}")
    for row in rows:
        if row.get("Reference"):
            continue
        swap = row.get("FileName", "").endswith("_swap")
        source = queries.get("QA_final_sc_filled.json" if swap else "QA_final.json") or next(iter(queries.values()))
        q = source.get(row["id"])
        if q is None:
            continue
        for key in ("FileName", "QuestionType", "SubQType", "Question"):
            row[key] = row.get(key) or q.get(key, "")
        row["Reference"] = q.get("ProcessedAnswer" if q["QuestionType"] == "Visualization" else "FinalAnswer") or ""
