"""Each worker's prefill work in a `hitq work` log of bench/gpu_scaling.py (its --logs RUN.log).

Maps the log's "[worker K/0 pid P] query N failed" lines (forced lengths give no [Final Answer]
line, so every job logs one) to the sample's prefix groups and counts per worker the groups it
ran, their prefix tokens (a group's shortest prompt: its questions are short) and the prefix
FLOPs (bench formula). A group that two workers ran is counted by both, which is how the split
groups of gpu-scaling-2xh200-split-groups.json showed up (CPU only; run here, not on the GPU):

    python bench/worker_prefill.py --data .carry/bench-data --model .carry/shared/models/qwen3-vl-8b-instruct-noweights LOG...
"""
import argparse
import collections
import re

from hitq.benchmark import prompts
from hitq.benchmark.query import job_rows
from hitq.engine.qwen3vl import TransformersEngine
from hitq.runconfig import RunConfig
from hitq.workers import bench

p = argparse.ArgumentParser()
p.add_argument("--data", required=True)
p.add_argument("--model", required=True)
p.add_argument("-n", type=int, default=300)
p.add_argument("logs", nargs="+")
args = p.parse_args()

queries = bench.sample_queries(args.data, args.n)
engine = TransformersEngine(args.model, device="cpu", load_weights=False)
config = RunConfig(modality="text", format="html", data_dir=args.data, model_dir=args.model, format_retries=0)
prompt_set = prompts.load_prompt_set(config.prompts)
key = {r["query_id"]: r["prefix_key"] for r in job_rows(queries, "text", "html")}
tokens = {q.id: bench._prepare(engine, q, config, prompt_set, 16).count.tokens for q in queries}
shape = {"text_params": 7568401408, "layers": 36, "d_attn": 4096, "vision_params": 0}  # Qwen3-VL-8B (bench JSON `model`)
for log in args.logs:
    ran = collections.defaultdict(set)
    for line in open(log):
        if m := re.search(r"\[worker (\d+)/\d+ pid \d+\] query (\d+) failed", line):
            ran[m.group(1)].add(int(m.group(2)))
    for worker, ids in sorted(ran.items()):
        groups = collections.defaultdict(list)
        for i in ids:
            groups[key[i]].append(tokens[i])
        flops = sum(bench.flops(shape, min(g), 0) for g in groups.values())
        print(f"{log}: worker {worker}: {len(ids)} jobs, {len(groups)} groups, {sum(min(g) for g in groups.values())} prefix tokens, "
              f"{flops / 1e15:.1f} prefix PFLOP")
