"""The predecessor's mix/markdown checkpoint: import, export back, requeue exactly the errors."""
from __future__ import annotations

import json

from click.testing import CliRunner

from hitq.cli.main import cli
from tests.conftest import SHARED

LEGACY = SHARED / "reference-runs" / "legacy-checkpoint-mix_markdown" / "checkpoint.json"


def test_import_export_requeue(db_url, tmp_path):
    runner = CliRunner()
    out = runner.invoke(cli, ["import-checkpoint", str(LEGACY), "--run", "mm", "--modality", "mix", "--format", "markdown", "--db", db_url])
    assert out.exit_code == 0, out.output
    assert "3060 rows imported (0 already present): 3032 done, 28 error" in out.output

    out = runner.invoke(cli, ["export", "--run", "mm", "--out", str(tmp_path / "exp"), "--db", db_url])
    assert out.exit_code == 0, out.output
    original = json.loads(LEGACY.read_text())
    exported = json.loads((tmp_path / "exp" / "checkpoint.json").read_text())
    key = lambda r: (r["id"], r["Prediction"], r["ProcessingTime"])  # noqa: E731
    assert [key(r) for r in exported["results"]] == [key(r) for r in original["results"]]
    assert exported["results"] == original["results"]  # Metrics come back too
    errors = {r["id"] for r in original["results"] if r["Prediction"].startswith("[ERROR")}
    assert set(exported["processed_ids"]) == {r["id"] for r in original["results"]} - errors

    out = runner.invoke(cli, ["requeue-errors", "--run", "mm", "--db", db_url])
    assert out.exit_code == 0 and "28 jobs re-queued" in out.output
    status = json.loads(runner.invoke(cli, ["status", "--json", "--db", db_url]).output)
    (run,) = status["runs"]
    assert run["counts"] == {"pending": 28, "running": 0, "done": 3032, "error": 0}
    from hitq.jobqueue import open_queue

    rows = open_queue(db_url).result_rows("mm")
    assert {r["query_id"] for r in rows if r["status"] == "pending"} == errors
    assert all(r["error_kind"] is None for r in rows)
