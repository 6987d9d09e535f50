"""Issue 8, criterion 3: one run drained by `hitq work --gpu 0` and the same run by `--gpu 0..1`.

The bench's sample (seeded whole tables, text/html, outputs forced to the reference answers'
lengths, random bf16 weights) is enqueued twice into one SQLite file; the real CLI drains the
first run on one GPU and the second on all the GPUs given, each worker a subprocess streaming
its jobs (a run of one table warms the compiled-kernel caches first). Rates are queries over the time from the run's first claim to its last finish (the
queue's own event log), so model loading is left out of both; wall time is reported too.

    python bench/gpu_scaling.py --data .carry/bench-data --model .carry/shared/models/qwen3-vl-8b-instruct-noweights \
        --reference .carry/bench-data/reference-results.json --gpus 0..1 > $OUT/gpu-scaling.json
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hitq.benchmark import prompts
from hitq.benchmark.query import job_rows
from hitq.cli.options import parse_engine_opts
from hitq.engine import measure
from hitq.jobqueue import open_queue
from hitq.runconfig import RunConfig
from hitq.workers import bench

p = argparse.ArgumentParser()
p.add_argument("--data", required=True)
p.add_argument("--model", required=True)
p.add_argument("--reference", required=True)
p.add_argument("-n", type=int, default=300)
p.add_argument("--gpus", default="0..1")
p.add_argument("--runs", default="warm,one,all", help="which of warm, one, all to run (a later call on the same warm machine)")
p.add_argument("--logs", help="a folder for each run's full worker log (RUN.log)")
p.add_argument("--engine-opt", action="append", default=[], metavar="KEY=VALUE", help="as hitq bench --engine-opt")
args = p.parse_args()

queries = bench.sample_queries(args.data, args.n)
lengths = bench.reference_lengths(args.reference, measure.tokenizer(args.model))
median = sorted(lengths.values())[len(lengths) // 2]
forced = {str(q.id): min(lengths.get(q.id, median), prompts.default_max_new_tokens(q)) for q in queries}
config = RunConfig(modality="text", format="html", data_dir=str(Path(args.data).resolve()), model_dir=str(Path(args.model).resolve()),
                   format_retries=0, extra={"bench": True, "engine_opts": {**parse_engine_opts(tuple(args.engine_opt)), "random_weights": True, "force_lengths": forced}})
config = RunConfig(**{**config.to_json(), "prompts_hash": prompts.load_prompt_set(config.prompts).sha256})
out = {"command": "python bench/gpu_scaling.py " + " ".join(sys.argv[1:]), "queries": len(queries), "tables": len({q.file_name for q in queries}), "forced_output_tokens": sum(forced.values())}

with tempfile.TemporaryDirectory() as tmp:
    url = f"sqlite:///{tmp}/scaling.db"
    queue = open_queue(url)
    for name in ("one", "all"):
        queue.enqueue(name, config.to_json(), config.hash, job_rows(queries, "text", "html"))
    # One table (without a chart answer: no 2,048-step tail) on the first GPU before either measured
    # run: fills torch.compile's on-disk caches, so that neither run pays the first compilation.
    charts = {q.file_name for q in queries if q.question_type == "Visualization"}
    warm_table = next(q.file_name for q in queries if q.file_name not in charts)
    first_table = [q for q in queries if q.file_name == warm_table]
    queue.enqueue("warm", config.to_json(), config.hash, job_rows(first_table, "text", "html"))
    for name, gpus in (("warm", args.gpus.split("..")[0]), ("one", args.gpus.split("..")[0]), ("all", args.gpus)):
        if name not in args.runs.split(","):
            continue
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "hitq.cli.main", "work", "--gpu", gpus, "--run", name, "--drain",
                               "--poll-seconds", "0.2", "--db", url], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if args.logs:
            Path(args.logs, f"{name}.log").write_text(proc.stderr)
        run = queue.get_run(name)
        events = queue.event_log(run.id)
        rows = queue.result_rows(name)
        first = min(e["at"] for e in events if e["kind"] == "claimed")
        last = max(e["at"] for e in events if e["kind"] in ("finished", "failed"))
        workers = sorted({e["worker"] for e in events if e["kind"] == "claimed"})
        key = {r["id"]: r["prefix_key"] for r in rows}
        claimers: dict = {}
        for e in events:
            if e["kind"] == "claimed":
                claimers.setdefault(key[e["job_id"]], set()).add(e["worker"])
        out[name] = {"gpus": gpus, "exit": proc.returncode, "wall_s": wall, "first_claim_to_last_finish_s": last - first,
                     "queries_per_s": len(rows) / (last - first), "statuses": {s: sum(r["status"] == s for r in rows) for s in
                                                                                 ("done", "error", "pending", "running")},
                     "jobs_per_worker": {w: sum(1 for e in events if e["kind"] == "claimed" and e["worker"] == w) for w in workers},
                     "groups": len(claimers), "groups_split": sum(len(ws) > 1 for ws in claimers.values()),
                     "worker_window_s": {w: [min(e["at"] for e in events if e["worker"] == w) - first,
                                             max(e["at"] for e in events if e["worker"] == w) - first] for w in workers},
                     "log_tail": [line for line in proc.stderr.splitlines() if "decode:" in line or "stream of" in line][-6:]}
        print(json.dumps({name: out[name]}), file=sys.stderr, flush=True)
if "one" in out and "all" in out:
    out["speedup"] = out["all"]["queries_per_s"] / out["one"]["queries_per_s"]
import torch  # noqa: E402 - after the runs: this process holds no GPU memory while they run

out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
out["torch"] = torch.__version__
print(json.dumps(out, indent=1, default=str))
