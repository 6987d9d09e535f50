"""`hitq preflight`: every prompt of a configuration tokenised exactly, before a GPU is touched."""
from __future__ import annotations

import json
from pathlib import Path

import click

from hitq.cli.queue import FORMATS, MODALITIES


@click.command()
@click.option("--data", "data_dir", required=True, type=click.Path(), help="RealHiTBench directory.")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Model directory (weights not needed).")
@click.option("--modality", type=click.Choice(MODALITIES), required=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True)
@click.option("--qa", "qa_file", help="QA file (default DATA/QA_final.json).")
@click.option("--ids", help="Query ids, e.g. 2747-2751,3019.")
@click.option("--types", help="QuestionTypes or SubQTypes.")
@click.option("--prompts", default="default", show_default=True, help="Prompt set: default, official, or a JSON file.")
@click.option("--protocol", type=click.Choice(["corrected", "predecessor", "official"]), default="corrected", show_default=True)
@click.option("--mix-says-latex", is_flag=True)
@click.option("--sc-protocol", type=click.Choice(["gold", "none"]), default="gold", show_default=True)
@click.option("--max-input-tokens", default=100_000, show_default=True)
@click.option("--min-pixels", default=4 * 32 * 32, show_default=True)
@click.option("--max-pixels", default=1280 * 32 * 32, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print {queries: [...], summary: {...}} as JSON.")
@click.option("--dump", "dump_dir", type=click.Path(file_okay=False), help="Write each final prompt to DIR/<id>.txt.")
def preflight(data_dir, model_dir, modality, fmt, qa_file, ids, types, prompts, protocol, mix_says_latex, sc_protocol,
              max_input_tokens, min_pixels, max_pixels, as_json, dump_dir):
    """Tokenise every prompt with the model's own processor (no weights loaded) and report sizes,
    truncation and missing inputs.

    \b
    Example:
      hitq preflight --data ~/RealHiTBench --model ~/models/Qwen3-VL-8B-Instruct --modality text --format html --ids 2747-2751
    """
    from hitq.benchmark import preflight as pf
    from hitq.benchmark import prompts as prompt_sets
    from hitq.benchmark import qa
    from hitq.benchmark.query import Query
    from hitq.cli.queue import check_model_dir
    from hitq.engine import load_engine
    from hitq.fileio import write_atomic
    from hitq.runconfig import RunConfig

    data = str(Path(data_dir).expanduser().resolve())
    queries = qa.select(qa.load_queries(data, qa_file, sc_protocol), qa.parse_ids(ids) if ids else None,
                        [t.strip() for t in types.split(",")] if types else None)
    config = RunConfig(modality=modality, format=fmt, data_dir=data, model_dir=check_model_dir(model_dir, "transformers"),
                       prompts=prompts, protocol=protocol, mix_says_latex=mix_says_latex, sc_protocol=sc_protocol,
                       max_input_tokens=max_input_tokens, min_pixels=min_pixels, max_pixels=max_pixels)
    prompt_set = prompt_sets.load_prompt_set(prompts, data)
    engine = load_engine("transformers", config.model_dir, device="cpu", load_weights=False)
    by_id: dict[int, Query] = {q.id: q for q in queries}

    with click.progressbar(length=len(queries), label="tokenising", file=click.get_text_stream("stderr")) as bar:
        report = pf.preflight(queries, config, prompt_set, engine.count_tokens, progress=lambda n: bar.update(1))
    if dump_dir:
        for row in report["queries"]:
            if row["error"] is None:
                fitted = pf.prepare_query(by_id[row["id"]], config, prompt_set, engine.count_tokens)
                write_atomic(Path(dump_dir) / f"{row['id']}.txt", pf.dump_prompt(fitted.messages))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{'id':>6} {'file':<32} {'tokens':>9} {'fitted':>9} {'rows cut':>8}  note")
    for r in report["queries"]:
        note = r["error"] or ("truncated" if r["truncated"] else "")
        click.echo(f"{r['id']:>6} {r['file']:<32} {r['original_tokens'] or '-':>9} {r['input_tokens'] or '-':>9} {r['rows_dropped']:>8}  {note}")
    s = report["summary"]
    click.echo(f"\n{s['n']} queries: {s['ok']} ok, {s['truncated']} truncated, {s['errors']} errors; "
               f"p50 {s['p50']} / p90 {s['p90']} / max {s['max']} tokens (budget {max_input_tokens})")
