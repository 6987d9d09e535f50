"""PNG plots for ``hitq report``; each function writes one file and returns its path.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly, so no pyplot state or
backend switch leaks into the calling process. ``runs`` is always an ordered mapping
``name -> RunData`` (see :mod:`hitq.evaluation.report`).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from hitq.evaluation.aggregate import HEADLINE

DPI = 100


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    import io

    from hitq.fileio import write_atomic

    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return write_atomic(path, png.getvalue())


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def per_type_bars(runs: dict, path: Path) -> Path:
    """Grouped bars: the 11 headline numbers (and Overall), one bar per run."""
    labels = [f"{t.replace('Structure Comprehending', 'Structure').replace('Numerical Reasoning', 'Numerical')}\n{m}"
              for t, m in HEADLINE] + ["Overall"]
    fig = _figure(max(8.0, 1.0 + 0.9 * len(labels)), 4.8)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(runs))
    for i, (name, run) in enumerate(runs.items()):
        by_type = run.summary["by_type"]
        values = [by_type.get(t, {}).get(m) for t, m in HEADLINE] + [run.summary["overall"].get("Overall")]
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [v or 0.0 for v in values], width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Headline metrics per question type")
    ax.legend(fontsize=8)
    return _save(fig, path)


def error_breakdown(runs: dict, path: Path) -> Path:
    """Stacked bars per run: generation errors by kind, plus unscored rows by reason."""
    fig = _figure(max(6.0, 1.5 + 1.2 * len(runs)), 4.5)
    ax = fig.add_subplot()
    counts = {}
    for name, run in runs.items():
        c = Counter(f"error: {r.get('error_kind') or 'unknown'}" for r in run.rows if r.get("status") == "error")
        c.update(f"unscored: {s['unscored_reason']}" for s in run.scores.values()
                 if s.get("unscored_reason") and s["unscored_reason"] != "error")
        counts[name] = c
    kinds = sorted({k for c in counts.values() for k in c})
    if not kinds:
        _empty(ax, "no errors and no unscored rows")
    bottoms = [0] * len(runs)
    for kind in kinds:
        heights = [counts[name].get(kind, 0) for name in runs]
        ax.bar(list(runs), heights, bottom=bottoms, label=kind)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    if kinds:
        ax.set_ylabel("rows")
        ax.legend(fontsize=7)
    ax.set_title("Errors and unscored rows")
    return _save(fig, path)


def token_histogram(runs: dict, path: Path) -> Path:
    """Histogram of prompt tokens per run, with each run's token budget as a vertical line."""
    fig = _figure(8.0, 4.5)
    ax = fig.add_subplot()
    drawn = False
    for name, run in runs.items():
        tokens = [float(r["input_tokens"]) for r in run.rows if r.get("input_tokens")]
        if tokens:
            ax.hist(tokens, bins=50, alpha=0.5, label=name)
            drawn = True
        budget = (run.config or {}).get("max_input_tokens")
        if budget:
            ax.axvline(float(budget), linestyle="--", color="red", label=f"{name} budget ({int(budget):,})")
            drawn = True
    if drawn:
        ax.set_xlabel("input tokens")
        ax.set_ylabel("queries")
        ax.legend(fontsize=8)
    else:
        _empty(ax, "no token counts recorded (predecessor files carry none)")
    ax.set_title("Prompt length")
    return _save(fig, path)


def time_per_query(runs: dict, path: Path) -> Path:
    """Box plot of processing time per query, one box per run."""
    fig = _figure(max(6.0, 1.5 + 1.2 * len(runs)), 4.5)
    ax = fig.add_subplot()
    data = {name: [float(r["processing_time"]) for r in run.rows if r.get("processing_time") is not None]
            for name, run in runs.items()}
    data = {k: v for k, v in data.items() if v}
    if data:
        ax.boxplot(list(data.values()), showfliers=True)
        ax.set_xticks(range(1, len(data) + 1))
        ax.set_xticklabels(list(data))
        ax.set_yscale("log")
        ax.set_ylabel("seconds per query (log)")
    else:
        _empty(ax, "no processing times recorded")
    ax.set_title("Time per query")
    return _save(fig, path)


PLOTS = (("per_type", per_type_bars), ("errors", error_breakdown), ("tokens", token_histogram),
         ("time", time_per_query))


def write_all(runs: dict, out_dir: Path) -> dict[str, Path]:
    """Every plot into ``out_dir``; returns ``{name: path}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return {name: fn(runs, out_dir / f"{name}.png") for name, fn in PLOTS}
