"""``hitq eval`` and ``hitq report``: scores and pictures from a run or a predictions file.

The evaluation modules (and with them rouge-score, sacrebleu, matplotlib, pandas) are imported
inside the command bodies, so ``hitq --help`` stays light.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from hitq.errors import UsageError

_db_option = click.option("--db", "db_url", envvar="HITQ_DB", default="sqlite:///hitq.db", show_envvar=True,
                          show_default=True, help="Job-queue database URL (for --run).")
_compat_option = click.option(
    "--compat", type=click.Choice(["corrected", "official"]), default="corrected", show_default=True,
    help="official: RealHiTBench's rules, defects included, to match published numbers; "
         "corrected: the fixed scorer (docs/evaluation.md).")
_data_option = click.option("--data", "data_dir", type=click.Path(file_okay=False),
                            help="Dataset directory (tables/ for charts, QA files for missing references).")
_timeout_option = click.option("--chart-timeout", type=float, default=15.0, show_default=True,
                               help="Seconds per chart execution before the sandbox kills it.")


def _score(run, compat: bool, chart_timeout: float, judge=None) -> None:
    from hitq.evaluation.aggregate import summarize
    from hitq.evaluation.scoring import score_rows

    run.scores = score_rows(run.rows, compat=compat, data_dir=run.data_dir, judge=judge,
                            chart_timeout_s=chart_timeout)
    run.summary = summarize(run.rows, run.scores)


def _judge(url, model, prompts_path, data_dir, table_format):
    if not url:
        return None
    if not prompts_path:
        raise UsageError("--judge-url needs --judge-prompts FILE (eval_prompts layout of prompts-official.json)")
    from hitq.evaluation.judge import Judge, load_prompts

    return Judge(url, model, load_prompts(prompts_path), data_dir=data_dir, table_format=table_format)


def _storable(scores: dict[int, dict]) -> dict[int, dict]:
    keep = (int, float, str, bool, type(None))
    return {rid: {k: v for k, v in s.items() if isinstance(v, keep)} for rid, s in scores.items()}


@click.command("eval")
@click.option("--run", "run_name", help="Run name in the job queue.")
@click.option("--predictions", type=click.Path(dir_okay=False),
              help="A results.json / checkpoint.json of the predecessor, or a hitq export.")
@_data_option
@_compat_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of a table.")
@click.option("--judge-url", help="OpenAI-compatible endpoint for Summary/Anomaly Analysis "
                                  "(API key from the HITQ_JUDGE_API_KEY environment variable).")
@click.option("--judge-model", default="gpt-4o-2024-08-06", show_default=True, help="Judge model name.")
@click.option("--judge-prompts", type=click.Path(dir_okay=False), help="JSON file with eval_prompts templates.")
@click.option("--judge-table-format", default="latex", show_default=True,
              help="Table format inserted into {table} of the judge prompts.")
@_timeout_option
@_db_option
def eval_command(run_name, predictions, data_dir, compat, as_json, judge_url, judge_model, judge_prompts,
                 judge_table_format, chart_timeout, db_url):
    """Score a run: EM, F1, ROUGE-L, SacreBLEU, chart ECR/Pass@1, per type and overall.

    Example:

        hitq eval --compat official --predictions results.json --data ./realhitbench
    """
    from hitq.evaluation.report import load_file, load_run, text_table

    if bool(run_name) == bool(predictions):
        raise UsageError("give exactly one of --run NAME or --predictions FILE")
    queue = None
    if run_name:
        run, queue = load_run(db_url, run_name)
        run.data_dir = data_dir or run.data_dir
    else:
        run = load_file(predictions, data_dir)
    judge = _judge(judge_url, judge_model, judge_prompts, run.data_dir, judge_table_format)
    _score(run, compat == "official", chart_timeout, judge)
    if queue is not None:
        queue.save_scores(run_name, _storable(run.scores))
    if as_json:
        doc = {"mode": compat, "run": run.name, **run.summary}
        click.echo(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        click.echo(f"{run.name}: {len(run.rows)} rows, scoring mode {compat}")
        click.echo(text_table(run.summary))


@click.command("report")
@click.option("--run", "run_names", multiple=True, help="Run name in the job queue (repeatable).")
@click.option("--predictions", multiple=True, type=click.Path(dir_okay=False),
              help="Predictions file (repeatable), as for `hitq eval`.")
@_data_option
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@_compat_option
@_timeout_option
@_db_option
def report(run_names, predictions, data_dir, out_dir, compat, chart_timeout, db_url):
    """Write PNG plots and a self-contained report.html comparing runs.

    Example:

        hitq report --run text_html --run mix_html --out report/
    """
    from hitq.evaluation import plots
    from hitq.evaluation.report import check_sources, load_file, load_run, write_html

    check_sources(run_names, predictions)
    runs = {}
    for name in run_names:
        run, _queue = load_run(db_url, name)
        run.data_dir = data_dir or run.data_dir
        runs[name] = run
    for path in predictions:
        run = load_file(path, data_dir)
        base, i = run.name, 2
        while run.name in runs:  # two files from same-named folders
            run.name, i = f"{base}-{i}", i + 1
        runs[run.name] = run
    for run in runs.values():
        _score(run, compat == "official", chart_timeout)
    out = Path(out_dir)
    written = plots.write_all(runs, out)
    html_path = write_html(runs, written, out / "report.html", compat)
    for path in [*written.values(), html_path]:
        click.echo(str(path))
