"""Commands that fill, inspect and empty the queue: enqueue, status, requeue-errors, export,
import-checkpoint."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from hitq.cli.options import db_option, parse_engine_opts, run_option
from hitq.errors import ModelDirError, UsageError

MODALITIES = ("text", "image", "mix")
FORMATS = ("html", "markdown", "latex", "csv", "json")


def resolve_run(queue, name: str | None):
    """The run called `name`, or the only run when no name is given."""
    if name:
        return queue.get_run(name)
    runs = queue.list_runs()
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise UsageError("the database has no runs yet: start with `hitq enqueue`")
    raise UsageError(f"the database has {len(runs)} runs: pass --run ({', '.join(r.name for r in runs)})")


def check_model_dir(model: str | None, engine: str) -> str | None:
    if engine == "fake" and not model:
        return None
    if not model:
        raise UsageError("--model DIR is required for the transformers engine")
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise ModelDirError(f"model directory {path} has no config.json: not a transformers model directory")
    return str(path.resolve())


def _ranges(ids: list[int]) -> str:
    ids, out, i = sorted(ids), [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


@click.command()
@click.option("--data", "data_dir", required=True, type=click.Path(), help="RealHiTBench directory (QA_final.json, html/, image/, …).")
@click.option("--model", "model_dir", type=click.Path(), help="Local model directory (Qwen3-VL-8B-Instruct or `hitq model tiny`).")
@click.option("--modality", type=click.Choice(MODALITIES), required=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True)
@click.option("--qa", "qa_file", help="QA file (default DATA/QA_final.json).")
@click.option("--ids", help="Query ids, e.g. 1-40,2747.")
@click.option("--types", help='QuestionTypes or SubQTypes, e.g. "Fact Checking,Counting".')
@click.option("--run", "run_name", help="Run name (default MODALITY_FORMAT).")
@click.option("--engine", type=click.Choice(["transformers", "fake"]), default="transformers", show_default=True)
@click.option("--engine-opt", "engine_opts", multiple=True, metavar="KEY=VALUE", help="Engine option (repeatable).")
@click.option("--prompts", default="default", show_default=True, help="Prompt set: default, official, or a JSON file.")
@click.option("--protocol", type=click.Choice(["corrected", "predecessor", "official"]), default="corrected", show_default=True)
@click.option("--mix-says-latex", is_flag=True, help="Reproduce the predecessor's mix prompts that always say latex.")
@click.option("--table-first", is_flag=True,
              help="Opt-in prompt layout (protocol corrected): the table before the instructions, so every question on a "
                   "table shares one prefill. It changes the prompt; the run, its export and bench JSON say so.")
@click.option("--sc-protocol", type=click.Choice(["gold", "none"]), default="gold", show_default=True)
@click.option("--max-input-tokens", default=100_000, show_default=True, help="Prompt budget, images included.")
@click.option("--min-pixels", default=4 * 32 * 32, show_default=True)
@click.option("--max-pixels", default=1280 * 32 * 32, show_default=True)
@click.option("--max-new-tokens", type=int, help="Default: by question type.")
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--top-k", default=0, show_default=True)
@click.option("--seed", type=int)
@click.option("--format-retries", default=1, show_default=True, help="Retries with a format reminder.")
@click.option("--max-attempts", default=3, show_default=True, help="Claims before a job that keeps dying is error/crashed.")
@db_option
def enqueue(data_dir, model_dir, modality, fmt, qa_file, ids, types, run_name, engine, engine_opts, prompts, protocol,
            mix_says_latex, table_first, sc_protocol, max_input_tokens, min_pixels, max_pixels, max_new_tokens, temperature, top_p,
            top_k, seed, format_retries, max_attempts, db):
    """Load the queries of one configuration into the queue (idempotent).

    A query whose input file is missing or a Git LFS pointer is enqueued as error/missing_input.

    \b
    Example:
      hitq enqueue --data ~/RealHiTBench --model ~/models/Qwen3-VL-8B-Instruct --modality mix --format html
    """
    from hitq.benchmark import qa, tables
    from hitq.benchmark.prompts import check_layout
    from hitq.benchmark.query import job_rows
    from hitq.jobqueue import open_queue
    from hitq.runconfig import RunConfig

    data = Path(data_dir).expanduser().resolve()
    queries = qa.select(qa.load_queries(str(data), qa_file, sc_protocol), qa.parse_ids(ids) if ids else None,
                        [t.strip() for t in types.split(",")] if types else None)
    if not queries:
        raise UsageError("no queries match --ids/--types")
    check_layout(protocol, table_first)
    config = RunConfig(
        modality=modality, format=fmt, data_dir=str(data), model_dir=check_model_dir(model_dir, engine), engine=engine,
        qa_file=qa_file or "QA_final.json", prompts=prompts, prompts_hash=_prompts_hash(prompts, str(data)), protocol=protocol,
        mix_says_latex=mix_says_latex, sc_protocol=sc_protocol, max_input_tokens=max_input_tokens, min_pixels=min_pixels,
        max_pixels=max_pixels, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        format_retries=format_retries, extra={"engine_opts": parse_engine_opts(engine_opts)} if engine_opts else {},
        table_first=table_first,
    )
    report = tables.validate_inputs(data, queries, modality, fmt, protocol)
    reasons = {i: f"{kind} input {name} is {entry['problem'].replace('_', ' ')}: {entry['path']}"
               for kind, files in report.items() for name, entry in files.items() for i in entry["ids"]}
    rows = [dict(row, max_attempts=max_attempts) for row in job_rows(queries, modality, fmt, reasons, table_first)]
    queue = open_queue(db)
    name = run_name or f"{modality}_{fmt}"
    added, present = queue.enqueue(name, config.to_json(), config.hash, rows)
    layout = " (table-first prompt layout: not the default prompt)" if table_first else ""
    click.echo(f"run {name}: {added} jobs added, {present} already present{layout}")
    for kind, files in report.items():
        for file_name, entry in sorted(files.items()):
            click.echo(f"  {kind}: {file_name} {entry['problem'].replace('_', ' ')} -> ids {_ranges(entry['ids'])} enqueued as error/missing_input")


def _prompts_hash(spec: str, data_dir: str) -> str:
    from hitq.benchmark import prompts

    return prompts.load_prompt_set(spec, data_dir).sha256


@click.command()
@run_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--watch", is_flag=True, help="Refresh every 2 seconds until Ctrl+C.")
@db_option
def status(run_name, as_json, watch, db):
    """Counts per status and error kind, throughput and ETA, and the live workers.

    \b
    Example:
      hitq status --watch
      hitq status --run mix_html --json
    """
    from hitq.jobqueue import open_queue

    queue = open_queue(db)
    runs = [queue.get_run(run_name)] if run_name else queue.list_runs()
    if as_json:
        click.echo(json.dumps({"runs": [queue.stats(r) for r in runs], "workers": queue.list_workers()}, indent=2, default=str))
        return
    if not watch:
        click.echo(_status_text(queue, runs))
        return
    try:
        while True:
            runs = [queue.get_run(run_name)] if run_name else queue.list_runs()
            click.clear()
            click.echo(time.strftime("%H:%M:%S ") + "hitq status (Ctrl+C to stop)\n" + _status_text(queue, runs))
            time.sleep(2)
    except KeyboardInterrupt:
        pass


def _status_text(queue, runs) -> str:
    from hitq.runconfig import RunConfig

    lines = [f"{'run':<24} {'pending':>8} {'running':>8} {'done':>8} {'error':>8} {'jobs/s':>8} {'ETA':>9}  errors"]
    for run in runs:
        s = queue.stats(run)
        c = s["counts"]
        eta = "-" if s["eta_s"] is None else time.strftime("%H:%M:%S", time.gmtime(s["eta_s"]))
        errors = ", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items()))
        name = run.name + (" [table-first]" if RunConfig.from_json(run.config).table_first else "")
        lines.append(f"{name:<24} {c['pending']:>8} {c['running']:>8} {c['done']:>8} {c['error']:>8} {s['jobs_per_s']:>8.3f} {eta:>9}  {errors}")
    alive = [w for w in queue.list_workers() if w["state"] == "running" and w["age_s"] < 120]
    lines.append(f"workers alive: {len(alive)}" + "".join(f"\n  {w['id']} device {w['device']} done {w['jobs_done']}" for w in alive))
    return "\n".join(lines)


@click.command("requeue-errors")
@run_option
@click.option("--kind", "kinds", help="Only these error kinds, e.g. oom,timeout.")
@click.option("--ids", help="Only these query ids, e.g. 1-40,2747.")
@db_option
def requeue_errors(run_name, kinds, ids, db):
    """Put failed jobs back to pending (the whole resume story).

    \b
    Example:
      hitq requeue-errors --run text_html --kind oom
    """
    from hitq.benchmark.qa import parse_ids
    from hitq.jobqueue import open_queue

    queue = open_queue(db)
    run = resolve_run(queue, run_name)
    n = queue.requeue(run.id, [k.strip() for k in kinds.split(",")] if kinds else None, parse_ids(ids) if ids else None)
    click.echo(f"run {run.name}: {n} jobs re-queued")


@click.command()
@run_option
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@db_option
def export(run_name, out_dir, db):
    """Write OUT/checkpoint.json (the predecessor's layout) and OUT/results.json (every row).

    \b
    Example:
      hitq export --run mix_html --out results/mix_html
    """
    from hitq.jobqueue import checkpoint, open_queue

    queue = open_queue(db)
    run = resolve_run(queue, run_name)
    ckpt, results = checkpoint.export(out_dir, run.name, run.config, queue.result_rows(run.name))
    click.echo(f"run {run.name}: wrote {ckpt} and {results}")


@click.command("import-checkpoint")
@click.argument("file", type=click.Path())
@click.option("--run", "run_name", required=True, help="Name of the new run.")
@click.option("--modality", type=click.Choice(MODALITIES), required=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True)
@click.option("--model", "model_dir", type=click.Path(), help="Model directory for re-running failed rows.")
@click.option("--data", "data_dir", type=click.Path(), help="RealHiTBench directory for re-running failed rows.")
@click.option("--max-input-tokens", default=100_000, show_default=True)
@db_option
def import_checkpoint(file, run_name, modality, fmt, model_dir, data_dir, max_input_tokens, db):
    """Load a predecessor checkpoint.json or results.json as a run: ok rows done, [ERROR] rows error.

    \b
    Example:
      hitq import-checkpoint old/checkpoint.json --run mix_markdown --modality mix --format markdown
      hitq requeue-errors --run mix_markdown
    """
    from hitq.benchmark.query import Query, prefix_key
    from hitq.jobqueue import checkpoint, open_queue
    from hitq.runconfig import RunConfig

    rows = checkpoint.read_checkpoint(file)
    data = str(Path(data_dir).resolve()) if data_dir else ""
    config = RunConfig(modality=modality, format=fmt, data_dir=data, model_dir=check_model_dir(model_dir, "fake"),
                       prompts_hash=_prompts_hash("default", data), max_input_tokens=max_input_tokens,
                       extra={"imported_from": str(Path(file).resolve())})
    jobs = []
    for r in rows:
        q = Query(r["id"], r["FileName"], r["QuestionType"], r["SubQType"], r["Question"], r["Reference"])
        jobs.append({"query_id": q.id, "file_name": q.file_name, "question_type": q.question_type, "sub_q_type": q.sub_q_type,
                     "question": q.question, "reference": q.reference, "prefix_key": prefix_key(modality, fmt, q.file_name, q.template_key),
                     **checkpoint.imported_result(r)})
    queue = open_queue(db)
    added, present = queue.enqueue(run_name, config.to_json(), config.hash, jobs, event="imported")
    stats = queue.stats(queue.get_run(run_name))
    click.echo(f"run {run_name}: {added} rows imported ({present} already present): "
               f"{stats['counts']['done']} done, {stats['counts']['error']} error")
