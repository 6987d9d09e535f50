"""How long a worker's main thread waits for the GIL after each GPU wait, while the feeder prepares (CPU).

In a stream the main thread blocks at every decode step's and prefill's sync (the GIL released)
and then needs the GIL to launch the next work, while the feeder thread fits and tokenises jobs
(partly in Python, holding the GIL). Python hands the GIL to a waiting thread only after the
holder's switch interval (`sys.setswitchinterval`, 5 ms by default). This probe models the main
thread as a loop of a GIL-free 15 ms wait (a ~17 ms decode step) and a little Python work, with
and without a feeder thread that prepares real queries (fit + prepare, as hitq bench does), and
reports how much later than the wait each iteration ends, per switch interval.

    python bench/probe_gil.py --data .carry/bench-data --model .carry/shared/models/qwen3-vl-8b-instruct-noweights \
        --table-first --out bench/probe-gil-cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time

from hitq.benchmark import prompts
from hitq.engine.qwen3vl import TransformersEngine
from hitq.runconfig import RunConfig
from hitq.workers import bench as core

WAIT_S = 0.015  # the GPU part of a step, during which the main thread holds no GIL


def main_loop(n: int) -> list[float]:
    """Per iteration: the time past WAIT_S until a step's host work (64 rows' bookkeeping) is done."""
    late = []
    for _ in range(n):
        t0 = time.perf_counter()
        time.sleep(WAIT_S)  # releases the GIL, as a CUDA sync does
        rows = [(i, i * 2, ((i, 100), (i + 1, 7)), False) for i in range(64)]
        sum(len(r) for r in rows)
        late.append((time.perf_counter() - t0 - WAIT_S) * 1000)
    return late


def feeder(engine, queries, config, prompt_set, stop: threading.Event, done: list) -> None:
    while not stop.is_set():
        for q in queries:
            if stop.is_set():
                return
            core._prepare(engine, q, config, prompt_set, 16)
            done.append(time.perf_counter())


def measure(engine, queries, config, prompt_set, interval: float | None, n: int) -> dict:
    sys.setswitchinterval(interval or 0.005)
    stop, done = threading.Event(), []
    thread = None
    if interval is not None:
        thread = threading.Thread(target=feeder, args=(engine, queries, config, prompt_set, stop, done), daemon=True)
        thread.start()
        time.sleep(1.0)  # the feeder is busy
    start = time.perf_counter()
    late = main_loop(n)
    seconds = time.perf_counter() - start
    stop.set()
    if thread is not None:
        thread.join()
    prepared = sum(1 for t in done if start <= t <= start + seconds)
    late.sort()
    return {"switch_interval_ms": (interval or 0.005) * 1000, "feeder": interval is not None, "iterations": n,
            "late_ms_mean": statistics.fmean(late), "late_ms_p50": late[len(late) // 2], "late_ms_p90": late[int(len(late) * 0.9)],
            "late_ms_max": late[-1], "feeder_queries_per_s": prepared / seconds}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--table-first", action="store_true")
    ap.add_argument("-n", type=int, default=400, help="main-loop iterations per setting")
    ap.add_argument("--out")
    args = ap.parse_args()
    queries = core.sample_queries(args.data, 1000, 0, "html")
    engine = TransformersEngine(args.model, device="cpu", load_weights=False)
    config = RunConfig(modality="text", format="html", data_dir=args.data, model_dir=args.model, table_first=args.table_first,
                       format_retries=0)
    prompt_set = prompts.load_prompt_set(config.prompts)
    runs = [measure(engine, queries, config, prompt_set, interval, args.n) for interval in (None, 0.005, 0.001, 0.0002)]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "wait_ms": WAIT_S * 1000, "command": " ".join(["python", *sys.argv]), "runs": runs}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
