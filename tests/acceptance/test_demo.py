"""`hitq demo`, the README's main command, end to end in a subprocess on the CPU."""
from __future__ import annotations

import json

from tests.acceptance.conftest import hitq


def test_demo_runs_the_whole_loop(tmp_path, env):
    out = hitq("demo", tmp_path / "demo", env=env, timeout=600)
    assert "[4/4] export" in out.stdout and "Done. Results:" in out.stdout
    results = json.loads((tmp_path / "demo" / "results" / "results.json").read_text())
    assert results["counts"]["pending"] == results["counts"]["running"] == 0
    assert results["counts"]["done"] >= 12  # the tiny model answers most sample questions
    assert {r["status"] for r in results["results"]} <= {"done", "error"}
    assert all(r["error_kind"] in (None, "bad_format") for r in results["results"])
    checkpoint = json.loads((tmp_path / "demo" / "results" / "checkpoint.json").read_text())
    assert len(checkpoint["results"]) == len(results["results"])
    assert results["config"]["modality"] == "mix" and all(r["image_pixels_after"] for r in results["results"])
    status = json.loads(hitq("status", "--json", "--db", tmp_path / "demo" / "hitq.db").stdout)
    assert status["runs"][0]["name"] == "demo"


def test_db_upgrade_and_current(tmp_path):
    db = tmp_path / "h.db"
    assert "current: empty" in hitq("db", "current", "--db", db).stdout
    assert "at revision 0002" in hitq("db", "upgrade", "--db", db).stdout
    assert "current: 0002; head: 0002" in hitq("db", "current", "--db", db).stdout
