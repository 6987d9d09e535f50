"""`hitq bench`'s glue on the CPU with the tiny model and the sample dataset: the worker path
really goes through a SQLite queue, the baseline runs, the JSON has the figures the README cites."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")

from hitq.benchmark.sample import write_sample  # noqa: E402
from hitq.workers import bench  # noqa: E402


def test_bench_runs_both_paths_on_the_same_queries(tiny_model, tmp_path):
    data = write_sample(tmp_path / "data", images=True)
    queries = bench.sample_queries(str(data), n=100, seed=1)
    tables = {q.file_name for q in queries}
    assert len(queries) >= 4 and all(q.file_name in tables for q in bench.sample_queries(str(data), 100, 1))
    lengths = {q.id: 3 + q.id % 5 for q in queries}
    result = bench.run(str(tiny_model), str(data), queries, lengths, modality="mix", baseline_n=2, claim=16,
                       device="cpu", random_weights=False)
    a, b = result["baseline"], result["worker"]
    assert a["queries"] == 2 and b["queries"] == len(queries) - result["prepare_errors"]
    assert b["output_tokens"] == sum(lengths[q.id] for q in queries)  # forced lengths, through the queue
    assert set(b["statuses"]) <= {"done", "error"} and b["db"] == "sqlite"
    assert result["logit_check"]["argmax_agree"] == result["logit_check"]["rows"]
    assert result["logit_check"]["max_rel_error"] < 1e-4
    assert result["ratio_b_over_a"] > 0 and 0 < b["floor_fraction_all_prefilled"]
