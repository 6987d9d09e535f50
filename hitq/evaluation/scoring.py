"""Score a list of rows: per-row metric values, keyed by query id.

Which metric a row gets (docs/evaluation.md has the full table):

============================  ==================================  ===============================
row                           ``compat="official"``               corrected (default)
============================  ==================================  ===============================
Fact Checking, Numerical,     official EM/F1/ROUGE-L/SacreBLEU,   corrected metrics; empty reference
Structure Comprehending,      rounded per row                     -> unscored ``empty_reference``
Rudimentary/Predictive/
Exploratory Analysis
Summary / Anomaly Analysis    official lexical metrics + Judge    Judge only (lexical overlap with a
                              when a judge is configured          free-text summary is meaningless)
Visualization                 ECR, Pass@1 (official rules)        ECR, Pass@1 (sandboxed, corrected)
generation error rows         scored like any answer (always 0)   not scored; counted as errors
============================  ==================================  ===============================

A metric that cannot be computed is ``None`` (unscored) and the row carries ``unscored_reason``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from hitq.evaluation import charts, qa_metrics

JUDGED_SUBTYPES = ("Summary Analysis", "Anomaly Analysis")
ORDERED_SUBTYPES = ("Ranking", "Sorting")
TEXT_METRICS = qa_metrics.METRICS
CHART_METRICS = ("ECR", "Pass@1")


def metrics_for(row: dict) -> tuple[str, ...]:
    """The metrics that apply to a row (its denominators), whatever the mode."""
    if row["QuestionType"] == "Visualization":
        return CHART_METRICS
    if row["SubQType"] in JUDGED_SUBTYPES:
        return TEXT_METRICS + ("Judge",)
    return TEXT_METRICS


def _text_scores(row: dict, compat: bool) -> dict:
    if compat:
        return qa_metrics.official_scores(row["Reference"], row["Prediction"])
    if row["status"] == "error":
        return {m: None for m in TEXT_METRICS} | {"unscored_reason": "error"}
    if row["SubQType"] in JUDGED_SUBTYPES:
        return {m: None for m in TEXT_METRICS} | {"unscored_reason": "needs_judge"}
    scores = qa_metrics.corrected_scores(row["Reference"], row["Prediction"],
                                         ordered=row["SubQType"] in ORDERED_SUBTYPES)
    if scores is None:
        return {m: None for m in TEXT_METRICS} | {"unscored_reason": "empty_reference"}
    return scores


def score_rows(
    rows: list[dict],
    *,
    compat: bool = False,
    data_dir: str | Path | None = None,
    judge: Callable[[dict], dict] | None = None,
    chart_timeout_s: float = charts.ROW_TIMEOUT_S,
    progress: Callable[[str], None] | None = None,
) -> dict[int, dict]:
    """Per-row scores ``{id: {metric: value or None, ...}}`` in percent.

    ``judge`` is called with a Summary/Anomaly row and returns ``{"Judge": score or None,
    "judge_raw": reply}`` (see :mod:`hitq.evaluation.judge`); without it those rows' ``Judge`` is
    unscored.
    """
    out: dict[int, dict] = {}
    chart_rows = []
    for row in rows:
        if row["QuestionType"] == "Visualization":
            if not compat and row["status"] == "error":
                out[row["id"]] = {"ECR": None, "Pass@1": None, "unscored_reason": "error"}
            else:
                chart_rows.append(row)
            continue
        scores = _text_scores(row, compat)
        if row["SubQType"] in JUDGED_SUBTYPES:
            if judge is not None and row["status"] != "error":
                scores.update(judge(row))
            else:
                scores["Judge"] = None
                scores.setdefault("unscored_reason", "error" if row["status"] == "error" else "no_judge")
        out[row["id"]] = scores
    if chart_rows:
        if progress:
            progress(f"running {len(chart_rows)} chart rows in the sandbox")
        for rid, result in charts.evaluate_charts(chart_rows, data_dir, compat=compat,
                                                  timeout_s=chart_timeout_s).items():
            if result["ECR"] is None:
                result["unscored_reason"] = result["chart_reason"]
            out[rid] = result
    return out
