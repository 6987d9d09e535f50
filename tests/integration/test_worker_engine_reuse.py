"""A worker keeps its model across runs that use the same engine, model and options."""
from __future__ import annotations

from click.testing import CliRunner

import hitq.engine
from hitq.benchmark.sample import write_sample
from hitq.cli.main import cli
from hitq.jobqueue import open_queue
from hitq.workers.worker import Worker, WorkerSpec


def test_one_model_load_for_runs_with_the_same_engine(tmp_path, monkeypatch):
    data, db = write_sample(tmp_path / "data", images=False), str(tmp_path / "h.db")
    for fmt, opts in (("html", []), ("csv", []), ("json", ["--engine-opt", "delay_s=0"])):
        result = CliRunner().invoke(cli, ["enqueue", "--data", str(data), "--modality", "text", "--format", fmt, "--engine", "fake", *opts, "--db", db])
        assert result.exit_code == 0, result.output
    loads = []
    real = hitq.engine.load_engine
    monkeypatch.setattr(hitq.engine, "load_engine", lambda *a, **k: loads.append((a, k)) or real(*a, **k))
    assert Worker(WorkerSpec(db=db, device="cpu", drain=True, poll_s=0.05)).loop() == 0
    queue = open_queue(db)
    assert all(queue.stats(run)["counts"]["done"] == 17 for run in queue.list_runs())
    assert len(loads) == 2  # html and csv share one engine; json has other engine options


def test_the_model_loads_before_the_first_claim(tmp_path, monkeypatch):
    """A worker claims only once its model is loaded: it holds no leases while it loads."""
    data, db = write_sample(tmp_path / "data", images=False), str(tmp_path / "h.db")
    result = CliRunner().invoke(cli, ["enqueue", "--data", str(data), "--modality", "text", "--format", "html", "--engine", "fake", "--db", db])
    assert result.exit_code == 0, result.output
    queue = open_queue(db)
    running_at_load = []
    real = hitq.engine.load_engine
    monkeypatch.setattr(hitq.engine, "load_engine", lambda *a, **k: running_at_load.append(
        queue.stats(queue.list_runs()[0])["counts"]["running"]) or real(*a, **k))
    assert Worker(WorkerSpec(db=db, device="cpu", drain=True, poll_s=0.05)).loop() == 0
    assert running_at_load == [0] and queue.stats(queue.list_runs()[0])["counts"]["done"] == 17
