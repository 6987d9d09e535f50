"""`hitq bench`: GPU throughput of hitq's worker path against the predecessor's method."""
from __future__ import annotations

import json
import logging
import sys

import click

from hitq.cli.options import parse_engine_opts
from hitq.cli.work import GPU_BATCH
from hitq.errors import UsageError

DEFAULT_MODEL = "../shared/models/qwen3-vl-8b-instruct-noweights"
DEFAULT_REFERENCE = "../shared/reference-runs/qwen3-vl-8b-text_html/results.json"


@click.command()
@click.option("--model", "model_dir", default=DEFAULT_MODEL, show_default=True,
              help="Qwen3-VL directory; the weights are random bf16 (config, tokenizer and processor are read).")
@click.option("--data", "data_dir", required=True, help="RealHiTBench copy (QA_final.json, html/, image/ for mix).")
@click.option("-n", "n", default=300, show_default=True, help="At least this many queries: whole tables, seeded order.")
@click.option("--seed", default=0, show_default=True)
@click.option("--modality", type=click.Choice(["text", "mix"]), default="text", show_default=True)
@click.option("--format", "fmt", default="html", show_default=True)
@click.option("--out-len", type=int, help="Force every output to N tokens (default: the reference answer's length).")
@click.option("--reference", default=DEFAULT_REFERENCE, show_default=True, help="Reference results.json (answer lengths).")
@click.option("--baseline-n", type=int, help="Time the baseline on this many of the queries (spread over prompt lengths).")
@click.option("--claim", default=GPU_BATCH, show_default=True,
              help="The worker's --batch-size (hitq work's default on a GPU): it streams, claiming an eighth at a time.")
@click.option("--out", "out_path", help="Write the JSON here too.")
@click.option("--table-first", is_flag=True, help="Both paths use the opt-in table-first prompt layout (labelled in the JSON).")
@click.option("--write-subset", help="Only copy the sampled tables (+ rendered images) to this folder, then exit (CPU).")
@click.option("--engine-opt", "engine_opts", multiple=True, metavar="KEY=VALUE",
              help="Transformers engine option for both paths, e.g. prefill_chunk=2048 (shown in the JSON's engine).")
def bench(model_dir, data_dir, n, seed, modality, fmt, out_len, reference, baseline_n, claim, out_path, table_first, write_subset,
          engine_opts):
    """Run N real queries through (a) the predecessor's method and (b) hitq's queue + worker path
    on one GPU, in one process, and print queries/s, TFLOP/s, floor fraction and the ratio b/a.

    \b
    Example:
      hitq bench --data ~/RealHiTBench --write-subset .carry/bench-data          # CPU: the sample only
      hitq bench --data .carry/bench-data --model .carry/shared/models/qwen3-vl-8b-instruct-noweights \\
          --reference .carry/bench-data/reference-results.json --out bench/text-html.json
    """
    from hitq.workers import bench as core

    if write_subset:
        sample = core.write_subset(data_dir, write_subset, n, seed, fmt, images=True)
        click.echo(f"{len(sample)} queries on {len({q.file_name for q in sample})} tables -> {write_subset}")
        return
    from hitq.engine import measure
    from hitq.fileio import write_atomic

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(message)s")
    logging.getLogger("hitq.engine").setLevel(logging.INFO)
    opts = parse_engine_opts(engine_opts)
    if set(opts) & core.BENCH_SETS:
        raise UsageError(f"--engine-opt {', '.join(sorted(set(opts) & core.BENCH_SETS))}: the bench sets "
                               f"{', '.join(sorted(core.BENCH_SETS))} itself")
    queries = core.sample_queries(data_dir, n, seed, fmt)
    lengths = core.reference_lengths(reference, measure.tokenizer(model_dir))
    result = core.run(model_dir, data_dir, queries, lengths, modality, fmt, baseline_n, claim, out_len, table_first=table_first,
                      engine_opts=opts)
    result["command"] = " ".join(["hitq", *sys.argv[1:]])  # what made this JSON
    text = json.dumps(result, indent=2, default=str)
    if out_path:
        write_atomic(out_path, text + "\n")
    a, b = result["baseline"], result["worker"]
    click.echo(text)
    click.echo(f"{result['gpu']}: {result['queries']} queries ({modality}/{fmt}), baseline on {a['queries']}")
    for name, r in (("a predecessor", a), ("b hitq worker", b)):
        click.echo(f"  {name:14s} {r['queries_per_s']:.3f} q/s  {r['prompt_tokens_per_s']:.0f} prompt tok/s  "
                   f"{r['useful_tflops']:.0f} TFLOP/s  floor {r['floor_fraction_shared_prefix']:.2f} (shared) "
                   f"{r['floor_fraction_all_prefilled']:.2f} (all)  peak {r['peak_memory_gib']:.1f} GiB  "
                   f"full pass {r['projected_full_pass_min']:.1f} min")
    modelled = result["baseline"]["modelled_on_all_queries"]
    click.echo(f"  ratio b/a {result['ratio_b_over_a']:.2f} (a timed on {result['baseline_queries']} queries); "
               f"{result['ratio_b_over_a_modelled']:.2f} with a modelled on all {modelled['queries']} "
               f"({modelled['queries_per_s']:.3f} q/s)   logit check {result['logit_check']}")
