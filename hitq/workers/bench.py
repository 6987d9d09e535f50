"""`hitq bench`: the predecessor's method against hitq's worker path, one model, one process.

    sample = sample_queries(data_dir, n=300, seed=0)        # whole tables with all their questions
    result = run(model_dir, data_dir, sample, lengths)       # (a) baseline, (b) queue path, JSON dict

(a) the predecessor's method: one query at a time, prompt fitted and prepared on the CPU, then
    `model.generate` (sdpa), every output forced to its reference length.
(b) hitq: the queries enqueued in a fresh SQLite queue and drained by a real `Worker`
    (claim -> Executor.run_batch -> engine.generate -> finish), the engine shared with (a).
Both include their CPU work (fitting, tokenising, image loading) in their wall time.

Useful FLOPs of a query with P prompt and O output tokens: 2 N (P + O) + 2 n_layers d_attn (P + O)^2
(N: text-model parameters without the embedding table; d_attn = heads x head_dim; causal QK^T and
AV) + 2 N_vision x image patches. The floor is those FLOPs at PEAK_FLOPS; the shared floor counts
each group's common prefix once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import statistics
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from hitq.benchmark import prompts, qa, tables
from hitq.benchmark.preflight import prepare_query
from hitq.benchmark.query import Query, job_row, job_rows
from hitq.engine.base import ImageLimits
from hitq.errors import JobError
from hitq.runconfig import RunConfig

log = logging.getLogger("hitq.bench")
PEAK_FLOPS = 790e12  # bf16 dense, H100/H200 (measured 778-798 TFLOP/s on this workplace's cards)
FULL_SET = 3063  # text/html queries with a table file, the full pass the projection is for


def _rank(seed: int, file_name: str) -> str:
    return hashlib.sha1(f"{seed}\0{file_name}".encode()).hexdigest()


def sample_queries(data_dir: str, n: int, seed: int = 0, fmt: str = "html") -> list[Query]:
    """Whole tables (all their questions) in a seeded order until at least n queries; tables
    without a readable file are skipped. A copy holding only the chosen tables samples the same."""
    by_table: dict[str, list[Query]] = defaultdict(list)
    for q in qa.load_queries(data_dir):
        by_table[q.file_name].append(q)
    chosen: list[Query] = []
    for name in sorted(by_table, key=lambda f: _rank(seed, f)):
        if len(chosen) >= n:
            break
        path = tables.table_path(data_dir, fmt, name)
        if path.is_file() and not tables.is_lfs_pointer(path):
            chosen.extend(by_table[name])
    return sorted(chosen, key=lambda q: q.id)


def write_subset(data_dir: str, out_dir: str, n: int, seed: int = 0, fmt: str = "html", images: bool = True) -> list[Query]:
    """Copy the sampled tables (and QA_final.json) to out_dir; with images, render each table to
    image/<table>.png (hitq.benchmark.render: stand-ins, the shared copy's PNGs are LFS pointers)."""
    import shutil

    from hitq.benchmark import render

    sample = sample_queries(data_dir, n, seed, fmt)
    out = Path(out_dir)
    (out / fmt).mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(data_dir) / "QA_final.json", out / "QA_final.json")
    for name in sorted({q.file_name for q in sample}):
        src = tables.table_path(data_dir, fmt, name)
        shutil.copy(src, out / fmt / src.name)
        if images:
            image = tables.image_path(out, name)
            image.parent.mkdir(parents=True, exist_ok=True)
            render.render_table_png(src, fmt, image)
    return sample


def reference_lengths(results_json: str, tokenizer) -> dict[int, int]:
    """Token length of each answer (`Prediction`) of the reference run; errors are left out."""
    rows = json.loads(Path(results_json).read_text())["results"]
    return {r["id"]: max(1, len(tokenizer(r["Prediction"])["input_ids"])) for r in rows
            if not str(r["Prediction"]).startswith("[ERROR")}


# -- FLOPs ----------------------------------------------------------------------------------


def model_shape(model) -> dict:
    c = model.config.text_config
    lm = model.model.language_model
    layers = sum(p.numel() for p in lm.layers.parameters()) + sum(p.numel() for p in model.lm_head.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {"text_params": layers, "vision_params": vision, "layers": c.num_hidden_layers,
            "d_attn": c.num_attention_heads * head_dim}


def flops(shape: dict, prompt: int, out: int, patches: int = 0, prefix: int = 0) -> float:
    """Useful FLOPs of one query; with prefix > 0, those of its part after a shared prefix."""
    total = prompt + out
    linear = 2 * shape["text_params"] * (total - prefix)
    attention = 2 * shape["layers"] * shape["d_attn"] * (total**2 - prefix**2)
    return linear + attention + (2 * shape["vision_params"] * patches if not prefix else 0)


# -- the two paths --------------------------------------------------------------------------


def _prepare(engine, query: Query, config: RunConfig, prompt_set, limit: int):
    fitted = prepare_query(query, config, prompt_set, engine.count_tokens)
    return engine.prepare(query.id, fitted.messages, ImageLimits(config.min_pixels, config.max_pixels), limit,
                          stop_at_answer=False, prefix_key=None)


def prepare_all(model_dir: str, queries: list[Query], config: RunConfig, limits: dict[int, int]) -> tuple[dict, int]:
    """Every query fitted and prepared on the CPU, in one process per core (spawned: a fork
    inherits the locks of the parent's threads and hung; each builds its own weightless engine):
    {query id: Prepared} and the number that failed (JobError). In one process, a 1,004-query
    table-first sample took minutes of the GPU machine's time."""
    chunks = [queries[i : i + 16] for i in range(0, len(queries), 16)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(len(chunks), os.cpu_count() or 1), context, _cpu_engine, (model_dir, config)) as pool:
        done = [row for rows in pool.map(_prepare_chunk, [(chunk, limits) for chunk in chunks]) for row in pickle.loads(rows)]
    prepared = {qid: p for qid, p in done if p is not None}
    return prepared, len(done) - len(prepared)


_worker: tuple = ()  # a pool process's (engine, config, prompt set)


def _cpu_engine(model_dir: str, config: RunConfig) -> None:
    from hitq.engine.qwen3vl import TransformersEngine

    global _worker
    _worker = (TransformersEngine(model_dir, device="cpu", load_weights=False), config, prompts.load_prompt_set(config.prompts))


def _prepare_chunk(args) -> bytes:
    """[(query id, Prepared, or None on JobError)], pickled by value: tensors sent as shared
    memory would take a file descriptor each."""
    queries, limits = args
    engine, config, prompt_set = _worker
    rows = []
    for q in queries:
        try:
            p = _prepare(engine, q, config, prompt_set, limits[q.id])
            p.prefix_key = job_row(q, config.modality, config.format, table_first=config.table_first)["prefix_key"]
            rows.append((q.id, p))
        except JobError:
            rows.append((q.id, None))
    return pickle.dumps(rows)


def run_baseline(engine, queries: list[Query], config: RunConfig, lengths: dict[int, int]) -> dict:
    """The predecessor's method: fit + prepare, then model.generate one query at a time.
    Each query's own time is kept (`per_query`: id, prompt tokens, output tokens, seconds)."""
    from hitq.engine import measure

    prompt_set = prompts.load_prompt_set(config.prompts, config.data_dir)
    measure.reset_peak()
    per_query, errors = [], 0
    measure.sync()
    start = time.perf_counter()
    for q in queries:
        t0 = time.perf_counter()
        n = lengths[q.id]
        try:
            p = _prepare(engine, q, config, prompt_set, n)
        except JobError:
            errors += 1
            continue
        out = measure.predecessor_generate(engine, p, n)
        measure.sync()
        per_query.append([q.id, p.count.tokens, out, time.perf_counter() - t0])
    seconds = time.perf_counter() - start
    return {"queries": len(per_query), "errors": errors, "seconds": seconds,
            "prompt_tokens": sum(r[1] for r in per_query), "output_tokens": sum(r[2] for r in per_query),
            "peak_memory_gib": measure.peak_gib(), "per_query": per_query}


def modelled_seconds(per_query: list, work: dict, everyone: dict) -> dict:
    """The baseline's time for every query, from its timed ones (the sample and the decode
    probes): least squares of t = c0 + c1 FLOPs + O (c2 + c3 P) with every coefficient >= 0
    (prefill is compute-bound; a decode step costs a constant plus the context it reads; no
    work takes negative time), evaluated on all queries (`everyone`: id -> (prompt tokens,
    output tokens)). Unconstrained, 16 short answers left c2/c3 free to go negative and the
    total to swing by a third from one call to the next."""
    import itertools

    import numpy as np

    def row(qid, prompt, out):
        return [1.0, work["flops"][qid] / 1e15, out, out * prompt / 1e5]

    x = np.array([row(q, p, o) for q, p, o, _ in per_query])
    y = np.array([t for *_, t in per_query])
    fits = []  # non-negative least squares for 4 unknowns: the best of the fits on each subset of them
    for k in range(1, x.shape[1] + 1):
        for cols in itertools.combinations(range(x.shape[1]), k):
            sub, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
            if (sub >= 0).all():
                coef = np.zeros(x.shape[1])
                coef[list(cols)] = sub
                fits.append((float(((x @ coef - y) ** 2).sum()), coef))
    coef = min(fits, key=lambda fit: fit[0])[1]
    total = float(sum(np.array(row(q, p, o)) @ coef for q, (p, o) in everyone.items()))
    return {"formula": "t = c0 + c1*PFLOPs + O*(c2 + c3*P/1e5), c >= 0", "coefficients": [float(c) for c in coef],
            "fitted_on": len(per_query), "seconds_all_queries": total, "queries": len(everyone),
            "queries_per_s": len(everyone) / total}


def decode_probes(engine, prepared: list, steps: int = 128) -> list:
    """The predecessor's method on the shortest and the longest of `prepared` with `steps` + 1
    forced new tokens: [id, prompt tokens, output tokens, seconds] rows that pin the decode
    terms of modelled_seconds (the sampled answers are a dozen tokens; a full set's chart answers
    run to 2,048)."""
    from hitq.engine import measure

    rows = []
    for p in (min(prepared, key=lambda p: p.count.tokens), max(prepared, key=lambda p: p.count.tokens)):
        measure.sync()
        t0 = time.perf_counter()
        out = measure.predecessor_generate(engine, p, steps + 1)
        measure.sync()
        rows.append([p.key, p.count.tokens, out, time.perf_counter() - t0])
    return rows


def run_worker(engine, queries: list[Query], config: RunConfig, claim: int, db_dir: str) -> dict:
    """hitq's path: enqueue into a fresh SQLite queue, drain it with a Worker holding `engine`."""
    from hitq.engine import measure
    from hitq.jobqueue import open_queue
    from hitq.workers.execute import Executor
    from hitq.workers.worker import Worker, WorkerSpec

    url = f"sqlite:///{Path(db_dir) / 'bench.db'}"
    queue = open_queue(url)
    name = f"bench-{config.modality}-{config.format}"
    queue.enqueue(name, config.to_json(), config.hash,
                  job_rows(queries, config.modality, config.format, table_first=config.table_first))
    spec = WorkerSpec(db=url, device="0", run_name=name, drain=True, lease_s=3600.0, batch_size=claim, poll_s=0.05)
    worker = Worker(spec)
    run = worker.queue.get_run(name)
    worker.executors = {run.id: Executor(worker.queue, worker.id, run, engine)}  # the loaded engine, shared with (a)
    measure.reset_peak()
    measure.sync()
    start = time.perf_counter()
    worker.loop()
    measure.sync()
    seconds = time.perf_counter() - start
    rows = queue.result_rows(name)
    done = [r for r in rows if r.get("status") in ("done", "error") and r.get("output_tokens") is not None]
    return {"queries": len(done), "statuses": dict(sorted(_count(r.get("status") for r in rows).items())),
            "error_kinds": dict(sorted(_count(r.get("error_kind") for r in rows if r.get("error_kind")).items())),
            "seconds": seconds, "prompt_tokens": sum(r.get("input_tokens") or 0 for r in done),
            "output_tokens": sum(r.get("output_tokens") or 0 for r in done),
            "peak_memory_gib": measure.peak_gib(), "claim_batch": claim, "db": "sqlite"}


def _count(values) -> dict:
    out: dict = defaultdict(int)
    for v in values:
        out[v] += 1
    return out


# -- the whole bench ------------------------------------------------------------------------


BENCH_SETS = frozenset({"device", "random_weights", "force_lengths", "fast"})  # engine options run() sets itself


def run(model_dir: str, data_dir: str, queries: list[Query], lengths: dict[int, int], modality: str = "text",
        fmt: str = "html", baseline_n: int | None = None, claim: int = 64, out_len: int | None = None,
        device: str = "cuda", random_weights: bool = True, table_first: bool = False, engine_opts: dict | None = None) -> dict:
    """Build the engine (random bf16 weights, `engine_opts` on top), check the fast path, time (a) and (b)."""
    from hitq.engine import measure
    from hitq.engine.qwen3vl import TransformersEngine

    median = int(statistics.median(lengths.values()))
    # The reference run allowed 4096 new tokens; hitq caps by question type (512/1024/2048), so a
    # reference answer longer than hitq's cap is forced to the cap, on both paths.
    forced = {q.id: out_len or min(lengths.get(q.id, median), prompts.default_max_new_tokens(q)) for q in queries}
    config = RunConfig(modality=modality, format=fmt, data_dir=str(data_dir), model_dir=str(model_dir), table_first=table_first,
                       format_retries=0, extra={"bench": True, "forced_output_lengths": "reference" if not out_len else out_len})
    prompt_set = prompts.load_prompt_set(config.prompts)
    config = RunConfig(**{**config.to_json(), "prompts_hash": prompt_set.sha256})
    # Every query once on the CPU, for token counts, shared prefixes and the checks (not timed).
    prepared, errors = prepare_all(model_dir, queries, config, forced)
    t0 = time.perf_counter()
    engine = TransformersEngine(model_dir, device=device, random_weights=random_weights, force_lengths=forced, fast=True,
                                **(engine_opts or {}))
    build_s = time.perf_counter() - t0
    shape = model_shape(engine.model)
    work = _work(queries, prepared, forced, shape, engine)

    groups = defaultdict(list)
    for q in queries:
        if q.id in prepared:
            groups[prepared[q.id].prefix_key].append(prepared[q.id])
    shared = [g for g in groups.values() if len(g) >= 2] or list(groups.values())
    small = min(shared, key=lambda g: max(p.count.tokens for p in g))
    check = measure.check_fast_logits(engine, small[:4])
    warm = sorted(prepared.values(), key=lambda p: p.count.tokens)[:2]
    engine.generate(warm, _greedy())  # warm-up: kernels, cuBLAS handles, allocator
    measure.predecessor_generate(engine, warm[0], 2)

    base_queries = _systematic(queries, prepared, baseline_n)
    # Each path starts from an emptied allocator: the fast path's KV arena must not leave the
    # baseline's `generate` to run in a fragmented cache (it once halved the baseline's rate).
    measure.release()
    a = run_baseline(engine, base_queries, config, forced)
    a["decode_probes"] = decode_probes(engine, [prepared[q.id] for q in base_queries if q.id in prepared])
    log.warning("baseline: %s", json.dumps(a))
    measure.release()
    with tempfile.TemporaryDirectory() as tmp:
        b = run_worker(engine, queries, config, claim, tmp)
    log.warning("worker path: %s", json.dumps(b))
    for r in (a, b):
        r["queries_per_s"] = r["queries"] / r["seconds"]
        r["prompt_tokens_per_s"] = r["prompt_tokens"] / r["seconds"]
    a["modelled_on_all_queries"] = modelled_seconds(
        a["per_query"] + a["decode_probes"], work, {q: (p.count.tokens, forced[q]) for q, p in prepared.items()})
    a_flops = sum(work["flops"][q.id] for q in base_queries if q.id in prepared)
    a["useful_tflops"] = a_flops / a["seconds"] / 1e12
    b["useful_tflops"] = work["total_flops"] / b["seconds"] / 1e12
    for r, fl, sh in ((a, a_flops, a_flops * work["shared_flops"] / work["total_flops"]),
                      (b, work["total_flops"], work["shared_flops"])):
        r["floor_fraction_all_prefilled"] = fl / PEAK_FLOPS / r["seconds"]
        r["floor_fraction_shared_prefix"] = sh / PEAK_FLOPS / r["seconds"]
        r["projected_full_pass_min"] = FULL_SET / r["queries_per_s"] / 60
    return {
        **measure.versions(engine), "engine": engine.describe(), "modality": modality, "format": fmt, "prompt_layout": "table-first (opt-in: changes the prompt)" if table_first else "default (not table-first)",
        "output_lengths": f"fixed {out_len}" if out_len else
        "reference run's answer lengths (results.json Prediction tokens), capped at hitq's max_new_tokens by type",
        "queries": len(queries), "prepare_errors": errors, "tables": len({q.file_name for q in queries}),
        "groups": len(groups), "questions_per_group": len(prepared) / max(1, len(groups)),
        "prompt_tokens": _summary([p.count.tokens for p in prepared.values()]),
        "output_tokens": _summary([forced[q] for q in prepared]),
        "model": shape, "peak_flops": PEAK_FLOPS, "useful_flops": work["total_flops"],
        "floor_s_all_prefilled": work["total_flops"] / PEAK_FLOPS, "floor_s_shared_prefix": work["shared_flops"] / PEAK_FLOPS,
        "logit_check": check, "baseline": a, "worker": b, "baseline_queries": len(base_queries),
        "ratio_b_over_a": b["queries_per_s"] / a["queries_per_s"],
        "ratio_b_over_a_modelled": b["queries_per_s"] / a["modelled_on_all_queries"]["queries_per_s"], "build_s": build_s,
    }


def _greedy():
    from hitq.engine.base import GenerationSettings

    return GenerationSettings()


def _summary(values: list[int]) -> dict:
    return {"n": len(values), "mean": statistics.mean(values), "median": statistics.median(values), "max": max(values),
            "sum": sum(values)} if values else {}


def _systematic(queries: list[Query], prepared: dict, n: int | None) -> list[Query]:
    """n queries spread evenly over the sample sorted by prompt length (all when n is None)."""
    ok = sorted((q for q in queries if q.id in prepared), key=lambda q: prepared[q.id].count.tokens)
    if not n or n >= len(ok):
        return ok
    return [ok[int((i + 0.5) * len(ok) / n)] for i in range(n)]


def _work(queries, prepared, forced, shape, engine) -> dict:
    """Useful FLOPs per query, and the total with each group's common prefix counted once."""
    from hitq.engine import fastgen

    per, shared = {}, 0.0
    groups = defaultdict(list)
    for q in queries:
        if q.id in prepared:
            p = prepared[q.id]
            patches = int(p.inputs["image_grid_thw"].prod(-1).sum()) if "image_grid_thw" in p.inputs else 0
            per[q.id] = flops(shape, p.count.tokens, forced[q.id], patches)
            groups[p.prefix_key].append((p, forced[q.id], patches))
    for members in groups.values():
        rows = [fastgen.Row(p, n) for p, n, _ in members]
        g = fastgen.make_groups(rows, engine.image_token_id)
        for grp in g:
            split = grp.split if len(grp.rows) > 1 else 0
            for i, r in enumerate(grp.rows):
                p, n = r.prepared, r.limit
                patches = next(pt for pp, _, pt in members if pp is p)
                shared += flops(shape, p.count.tokens, n, patches, prefix=split)
            if split:
                shared += flops(shape, split, 0, next(pt for pp, _, pt in members if pp is grp.rows[0].prepared))
    return {"flops": per, "total_flops": sum(per.values()), "shared_flops": shared}
