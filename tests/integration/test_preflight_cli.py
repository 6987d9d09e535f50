"""`hitq preflight` with the real Qwen3-VL-8B processor (no weights) on the sample data."""
from __future__ import annotations

import json

from click.testing import CliRunner

from hitq.benchmark.sample import write_sample
from hitq.cli.main import cli
from tests.conftest import SHARED

NOWEIGHTS = SHARED / "models" / "qwen3-vl-8b-instruct-noweights"


def test_preflight_json_and_dump(tmp_path):
    data = write_sample(tmp_path / "data")
    (data / "csv" / "demo-table03.csv").unlink()
    args = ["preflight", "--data", data, "--model", NOWEIGHTS, "--modality", "mix", "--format", "csv", "--max-input-tokens", "600",
            "--json", "--dump", tmp_path / "prompts"]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = {r["id"]: r for r in report["queries"]}
    assert set(rows[1]) >= {"id", "file", "original_tokens", "input_tokens", "truncated", "rows_dropped", "image_pixels", "error"}
    missing = [r for r in rows.values() if r["error"]]
    assert missing and all(r["file"].startswith("demo-table03") and r["error"].startswith("missing_input") for r in missing)
    ok = [r for r in rows.values() if not r["error"]]
    assert all(r["input_tokens"] <= 600 and r["image_pixels"] > 0 for r in ok)
    assert any(r["truncated"] and r["rows_dropped"] > 0 for r in ok)
    dumped = (tmp_path / "prompts" / f"{ok[0]['id']}.txt").read_text()
    assert "[Final Answer]" in dumped and ok[0]["file"] in json.dumps(report)
    assert report["summary"]["n"] == len(rows) and report["summary"]["max"] <= 600
