"""Loading runs for evaluation, the text table of ``hitq eval`` and the HTML of ``hitq report``.

A run comes either from the job queue (``--run NAME``: rows, config and a place to store scores) or
from a file (``--predictions FILE``: predecessor results/checkpoint or a hitq export).
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from hitq.errors import NotFound, UsageError

COLUMNS = ("EM", "F1", "ROUGE-L", "SacreBLEU", "ECR", "Pass@1", "Judge")


@dataclass
class RunData:
    """One scored run: its rows, per-row scores, the summary document and the run's settings."""

    name: str
    rows: list[dict]
    config: dict = field(default_factory=dict)
    scores: dict[int, dict] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    data_dir: str | None = None


def load_run(db_url: str, run_name: str) -> tuple[RunData, object]:
    """Rows and config of a queue run; returns (RunData, queue) so that scores can be saved back."""
    from hitq.jobqueue import open_queue  # provided by the job-queue package

    from hitq.evaluation.predictions import normalize_row

    queue = open_queue(db_url)
    run = queue.get_run(run_name)
    if run is None:
        raise NotFound(f"no run named {run_name!r} in {db_url}")
    rows = [normalize_row(r) for r in queue.result_rows(run_name)]
    config = dict(getattr(run, "config", {}) or {})
    return RunData(run_name, sorted(rows, key=lambda r: r["id"]), config, data_dir=config.get("data_dir")), queue


def load_file(path: str, data_dir: str | None) -> RunData:
    """Rows of a predictions file; references missing from the rows are taken from ``data_dir``."""
    from hitq.evaluation.predictions import fill_references, load_predictions

    rows, meta = load_predictions(path)
    fill_references(rows, data_dir)
    return RunData(str(meta.get("name")), rows, meta, data_dir=data_dir)


def check_sources(runs: tuple[str, ...], predictions: tuple[str, ...]) -> None:
    if not runs and not predictions:
        raise UsageError("give --run NAME or --predictions FILE")


# --------------------------------------------------------------------------- text table


def _cell(group: dict, metric: str) -> str:
    counts = group.get("counts", {}).get(metric)
    if counts is None:
        return "—"
    if group.get(metric) is None:  # nothing scored: errors alone give no number
        return f"unscored ({counts['unscored']})"
    return f"{group[metric]:.2f}"


def text_table(summary: dict, subtypes: bool = True) -> str:
    """The table printed by ``hitq eval``: one line per type (and subtype), denominators explicit."""
    header = ["type", "n", "scored", "errors", "unscored", *COLUMNS]
    lines = []
    for qtype, group in summary["by_type"].items():
        lines.append([qtype, *_counts(group), *(_cell(group, m) for m in COLUMNS)])
        for sub, sgroup in (summary["by_subtype"].get(qtype, {}) if subtypes else {}).items():
            if sub != qtype:
                lines.append([f"  {sub}", *_counts(sgroup), *(_cell(sgroup, m) for m in COLUMNS)])
    overall = summary["overall"]
    lines.append(["micro-average", *_counts(overall), *(_cell(overall, m) for m in COLUMNS)])
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]
    fmt = lambda row: "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)  # noqa: E731
                                for i, (v, w) in enumerate(zip(row, widths)))
    out = [fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)]
    complete = "" if overall.get("overall_complete") else " (incomplete: some headline numbers missing)"
    if overall.get("Overall") is not None:
        out.append(f"Overall (mean of the 11 headline numbers, errors as zero): {overall['Overall']:.2f}{complete}")
    return "\n".join(out)


def _counts(group: dict) -> list:
    return [group["n"], group["scored"], group["errors"], group["unscored"]]


# --------------------------------------------------------------------------- HTML


def _html_table(summary: dict) -> str:
    rows = []
    for qtype, group in summary["by_type"].items():
        rows.append((qtype, group, "type"))
        for sub, sgroup in summary["by_subtype"].get(qtype, {}).items():
            if sub != qtype:
                rows.append((sub, sgroup, "sub"))
    rows.append(("micro-average", summary["overall"], "type"))
    head = "".join(f"<th>{h}</th>" for h in ("type", "n", "scored", "errors", "unscored", *COLUMNS))
    body = "".join(
        f"<tr class='{cls}'><td>{html.escape(name)}</td>"
        + "".join(f"<td>{v}</td>" for v in _counts(g))
        + "".join(f"<td>{html.escape(_cell(g, m))}</td>" for m in COLUMNS) + "</tr>"
        for name, g, cls in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}
tr.sub td:first-child{padding-left:2em;color:#555}img{max-width:100%;border:1px solid #eee;margin:.5em 0}"""


def write_html(runs: dict[str, RunData], plots: dict[str, Path], out: Path, mode: str) -> Path:
    """One self-contained HTML file: every plot embedded as a base64 data URI, one table per run."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>hitq report</title><style>{_STYLE}</style>"
             f"</head><body><h1>hitq report</h1><p>Scoring mode: <b>{html.escape(mode)}</b>. "
             "Values in percent; <i>errors</i> count as zero, <i>unscored</i> rows are in no denominator.</p>"]
    for name, path in plots.items():
        data = base64.b64encode(Path(path).read_bytes()).decode()
        parts.append(f"<h2>{html.escape(name)}</h2><img id='plot-{html.escape(name)}' alt='{html.escape(name)}' "
                     f"src='data:image/png;base64,{data}'>")
    for name, run in runs.items():
        overall = run.summary["overall"].get("Overall")
        parts.append(f"<h2>Run {html.escape(name)}</h2><p>{len(run.rows)} rows; Overall "
                     f"{'—' if overall is None else f'{overall:.2f}'}</p>{_html_table(run.summary)}")
    parts.append("</body></html>")
    from hitq.fileio import write_atomic

    return write_atomic(out, "\n".join(parts))
