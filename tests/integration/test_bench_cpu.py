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
    probes = a["decode_probes"]  # the shortest and the longest timed prompt, 129 forced tokens each
    assert [r[2] for r in probes] == [129, 129] and probes[0][1] <= probes[1][1]
    assert a["modelled_on_all_queries"]["fitted_on"] == 2 + len(probes)


def test_the_modelled_baseline_takes_no_negative_work():
    """modelled_seconds: exact data of a non-negative model are fitted exactly; noisy short
    answers, where plain least squares makes decode context cost negative, get coefficients >= 0."""
    flops = {i: (i + 1) * 1e14 for i in range(8)}
    true = [0.05, 2.5, 0.03, 0.01]
    timed = [[i, 1000 * (i + 1), out, true[0] + true[1] * flops[i] / 1e15 + out * (true[2] + true[3] * (i + 1) / 100)]
             for i, out in enumerate([1, 2, 5, 3, 200, 7, 2, 150])]
    fit = bench.modelled_seconds(timed, {"flops": flops}, {i: (1000 * (i + 1), 10) for i in range(8)})
    assert fit["coefficients"] == pytest.approx(true, rel=1e-6)
    noisy = [r[:3] + [r[3] * (1.3 if r[2] > 100 and r[0] > 5 else 1.0)] for r in timed]  # the long answer at long context: slower
    noisy[4][3] *= 1.8  # the long answer at short context: far slower
    fit = bench.modelled_seconds(noisy, {"flops": flops}, {i: (1000 * (i + 1), 10) for i in range(8)})
    assert min(fit["coefficients"]) >= 0 and fit["fitted_on"] == 8 and fit["queries_per_s"] > 0
