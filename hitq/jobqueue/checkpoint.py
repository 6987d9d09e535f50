"""The predecessor's files: read its checkpoint.json, write checkpoint.json and results.json.

checkpoint.json is `{"results": [row...], "processed_ids": [id...]}` with row keys id, FileName,
QuestionType, SubQType, Question, Reference, Prediction, ProcessingTime; failed rows carry
`[ERROR] <kind>: <message>` as Prediction and are absent from processed_ids, so that the
predecessor's own `--resume` would retry them (it never did: realhitbench.md §e).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from hitq.errors import DataError
from hitq.fileio import write_json_many

ROW_KEYS = ("id", "FileName", "QuestionType", "SubQType", "Question", "Reference", "Prediction")
# How a predecessor `[ERROR] …` string maps onto hitq's error kinds, first match wins.
ERROR_KINDS = [
    (re.compile(r"\bOOM\b|out of memory", re.I), "oom"),
    (re.compile(r"final answer format", re.I), "bad_format"),
    (re.compile(r"not found|No such file", re.I), "missing_input"),
    (re.compile(r"decompression bomb|exceeds limit of", re.I), "bad_input"),
    (re.compile(r"time ?out", re.I), "timeout"),
]


def classify_error(prediction: str) -> str:
    for pattern, kind in ERROR_KINDS:
        if pattern.search(prediction):
            return kind
    return "engine_error"


def read_checkpoint(path: str | Path) -> list[dict]:
    """Rows of a predecessor checkpoint.json or results.json, validated."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"checkpoint file not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not a JSON checkpoint: {e}") from None
    rows = data.get("results") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise DataError(f"{path} has no 'results' list: not a predecessor checkpoint or results file")
    seen = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(k not in row for k in ROW_KEYS):
            missing = [k for k in ROW_KEYS if not isinstance(row, dict) or k not in row]
            raise DataError(f"{path}: results[{i}] lacks {', '.join(missing)}")
        if not isinstance(row["id"], int) or isinstance(row["id"], bool):
            raise DataError(f"{path}: results[{i}] has a non-integer id {row['id']!r}")
        bad = [k for k in ROW_KEYS[1:] if not isinstance(row[k], str)]
        if bad:
            raise DataError(f"{path}: results[{i}] (id {row['id']}) has non-string {', '.join(bad)}")
        pt = row.get("ProcessingTime")
        if pt is not None and (not isinstance(pt, (int, float)) or isinstance(pt, bool)):
            raise DataError(f"{path}: results[{i}] (id {row['id']}) has a non-numeric ProcessingTime")
        if row["id"] in seen:
            raise DataError(f"{path}: id {row['id']} appears twice")
        seen.add(row["id"])
    return rows


def imported_result(row: dict) -> dict:
    """Queue fields for one checkpoint row: done with its prediction, or error with a kind."""
    prediction = row["Prediction"]
    fields = {"processing_time": row.get("ProcessingTime"), "details": {"imported_prediction": prediction}}
    if isinstance(row.get("Metrics"), dict):
        fields["scores"] = row["Metrics"]
    if prediction.startswith("[ERROR"):
        message = re.sub(r"^\[ERROR\]\s*", "", prediction)
        return dict(fields, status="error", error_kind=classify_error(prediction), error_message=message, raw_output=prediction)
    return dict(fields, status="done", prediction=prediction)


def _prediction(job: dict) -> str | None:
    if job["status"] == "error":
        imported = (job.get("details") or {}).get("imported_prediction")
        if imported and imported.startswith("[ERROR"):
            return imported  # keep the predecessor's own error string on a round trip
        return f"[ERROR] {job['error_kind']}: {job['error_message']}"
    return job["prediction"] or "" if job["status"] == "done" else None


def legacy_row(job: dict) -> dict:
    """One job in the predecessor's row layout (Prediction None while unfinished)."""
    row = {
        "id": job["query_id"], "FileName": job["file_name"], "QuestionType": job["question_type"],
        "SubQType": job["sub_q_type"], "Question": job["question"], "Reference": job["reference"],
        "Prediction": _prediction(job),
    }
    if job.get("scores"):
        row["Metrics"] = job["scores"]
    row["ProcessingTime"] = job["processing_time"]
    return row


RESULT_KEYS = (
    "status", "error_kind", "error_message", "attempts", "original_tokens", "input_tokens", "output_tokens", "truncated",
    "rows_dropped", "image_pixels_before", "image_pixels_after", "queue_time", "raw_output", "scores", "details",
)


def export(out_dir: str | Path, run_name: str, config: dict, jobs: list[dict]) -> tuple[Path, Path]:
    """Write out_dir/checkpoint.json (finished rows) and out_dir/results.json (every row) atomically."""
    out = Path(out_dir)
    finished = [j for j in jobs if j["status"] in ("done", "error")]
    checkpoint = {
        "results": [dict(legacy_row(j), ProcessingTime=j["processing_time"] or 0.0) for j in finished],
        "processed_ids": [j["query_id"] for j in finished if j["status"] == "done"],
    }
    results = {
        "run": run_name,
        "config": config,
        "counts": {s: sum(j["status"] == s for j in jobs) for s in ("pending", "running", "done", "error")},
        "results": [dict(legacy_row(j), **{k: j.get(k) for k in RESULT_KEYS}) for j in jobs],
    }
    # Both files or neither: a full disk or a read-only directory leaves the previous export whole.
    ckpt, res = write_json_many({out / "checkpoint.json": checkpoint, out / "results.json": results})
    return ckpt, res
