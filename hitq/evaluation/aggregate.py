"""Per-type and per-subtype means with explicit denominators, and the two "Overall" numbers.

For every group and metric we report

* ``n``          rows of the group to which the metric applies,
* ``scored``     non-error rows with a value,
* ``errors``     generation-error rows (counted as 0 in the headline value),
* ``unscored``   non-error rows without a value (no judge, empty reference, missing table, ...),

and two means: ``value`` (errors counted as zero: the published convention, where failed queries are
wrong answers) and ``excluding_errors`` (errors dropped). Unscored rows are never in a denominator.

"Overall" is the unweighted mean of the 11 headline numbers as published (FC F1/EM, NR F1/EM,
SC F1/EM, DA ROUGE-L/F1/EM, Viz ECR/Pass@1); the ``micro`` block is the row-weighted mean of each
metric over all rows it applies to.
"""
from __future__ import annotations

from collections import defaultdict

from hitq.evaluation.scoring import CHART_METRICS, TEXT_METRICS, metrics_for

QUESTION_TYPES = ("Fact Checking", "Numerical Reasoning", "Data Analysis", "Structure Comprehending",
                  "Visualization")
ALL_METRICS = TEXT_METRICS + CHART_METRICS + ("Judge",)
HEADLINE = (("Fact Checking", "F1"), ("Fact Checking", "EM"), ("Numerical Reasoning", "F1"),
            ("Numerical Reasoning", "EM"), ("Structure Comprehending", "F1"), ("Structure Comprehending", "EM"),
            ("Data Analysis", "ROUGE-L"), ("Data Analysis", "F1"), ("Data Analysis", "EM"),
            ("Visualization", "ECR"), ("Visualization", "Pass@1"))


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


def _group(rows: list[dict], scores: dict[int, dict]) -> dict:
    """Stats of one group of rows: metric values at top level plus ``counts`` per metric."""
    cells: dict[str, dict] = defaultdict(lambda: {"with": [], "without": [], "errors": 0, "unscored": 0})
    any_scored = errors = 0
    for row in rows:
        s = scores.get(row["id"], {})
        is_error = row.get("status") == "error"
        errors += is_error
        row_scored = False
        for m in metrics_for(row):
            value, cell = s.get(m), cells[m]
            if is_error:
                cell["errors"] += 1
                cell["with"].append(value or 0.0)  # official protocol may have scored the text (always 0)
            elif value is None:
                cell["unscored"] += 1
            else:
                row_scored = True
                cell["with"].append(value)
                cell["without"].append(value)
        any_scored += row_scored and not is_error
    out: dict = {"n": len(rows), "scored": any_scored, "errors": errors,
                 "unscored": len(rows) - any_scored - errors, "excluding_errors": {}, "counts": {}}
    for m in ALL_METRICS:
        if m not in cells:
            continue
        c = cells[m]
        scored = len(c["without"])
        out[m] = _mean(c["with"]) if scored else None
        out["excluding_errors"][m] = _mean(c["without"])
        out["counts"][m] = {"n": scored + c["errors"] + c["unscored"], "scored": scored,
                            "errors": c["errors"], "unscored": c["unscored"]}
    return out


def summarize(rows: list[dict], scores: dict[int, dict]) -> dict:
    """The ``hitq eval --json`` document: ``by_type``, ``by_subtype``, ``overall``."""
    by_type: dict[str, list] = defaultdict(list)
    by_sub: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_type[row["QuestionType"]].append(row)
        by_sub[row["QuestionType"]][row["SubQType"] or "(empty)"].append(row)
    order = [t for t in QUESTION_TYPES if t in by_type] + sorted(t for t in by_type if t not in QUESTION_TYPES)
    result = {
        "by_type": {t: _group(by_type[t], scores) for t in order},
        "by_subtype": {t: {s: _group(rs, scores) for s, rs in sorted(by_sub[t].items(), key=lambda kv: -len(kv[1]))}
                       for t in order},
    }
    result["overall"] = _overall(rows, scores, result["by_type"])
    return result


def _overall(rows: list[dict], scores: dict[int, dict], by_type: dict) -> dict:
    headline = {f"{t} {m}": by_type.get(t, {}).get(m) for t, m in HEADLINE}
    present = [v for v in headline.values() if v is not None]
    micro = _group(rows, scores)
    overall = {m: micro[m] for m in ALL_METRICS if m in micro}
    overall.update(
        n=micro["n"], scored=micro["scored"], errors=micro["errors"], unscored=micro["unscored"],
        Overall=round(sum(present) / len(present), 2) if present else None,
        overall_complete=len(present) == len(HEADLINE),
        headline=headline, excluding_errors=micro["excluding_errors"], counts=micro["counts"],
    )
    return overall
