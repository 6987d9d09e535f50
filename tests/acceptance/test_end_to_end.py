"""The real transformers path on the tiny Qwen3-VL: every modality and format on real tables,
the predecessor's 28 failed rows re-run, the OOM ladder and the format-retry cap."""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from hitq.benchmark.render import ensure_images
from hitq.jobqueue import open_queue
from tests.acceptance.conftest import hitq
from tests.conftest import SHARED

PAIRS = [(m, f) for m in ("text", "image", "mix") for f in ("html", "markdown", "latex", "csv", "json")]
LEGACY = SHARED / "reference-runs" / "legacy-checkpoint-mix_markdown" / "checkpoint.json"


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A private copy of the dataset (images are rendered into it, replacing LFS pointers)."""
    target = tmp_path_factory.mktemp("rhb") / "data"
    subprocess.run([str(SHARED / "realhitbench" / "unpack"), str(target), "html", "markdown", "latex", "json", "csv", "image"],
                   check=True, capture_output=True)
    ensure_images(target, ["employment-table01", "economy-table01"])
    return target


def test_every_modality_and_format(tmp_path, tiny, data, env):
    db = f"sqlite:///{tmp_path / 'h.db'}"
    for modality, fmt in PAIRS:
        hitq("enqueue", "--data", data, "--model", tiny, "--modality", modality, "--format", fmt, "--ids", "1-2",
             "--max-input-tokens", "3000", "--max-new-tokens", "16", "--db", db)
    hitq("work", "--gpu", "cpu", "--drain", "--batch-size", "2", "--poll-seconds", "0.1", "--db", db, env=env, timeout=600)
    q = open_queue(db)
    answered = 0
    for modality, fmt in PAIRS:
        rows = q.result_rows(f"{modality}_{fmt}")
        for r in rows:
            # The tiny model was taught to answer `[Final Answer]: 42`; on some prompts it still
            # rambles, and that must end as a classified bad_format with the raw output kept.
            assert r["status"] == "done" or r["error_kind"] == "bad_format", (modality, fmt, r["error_message"])
            answered += r["status"] == "done" and r["prediction"] == "42"
            assert r["raw_output"] and r["output_tokens"] > 0 and r["processing_time"] > 0
            assert 0 < r["input_tokens"] <= 3000
            if modality == "text":
                assert r["image_pixels_before"] is None
            else:
                assert r["image_pixels_before"] > 0 and 0 < r["image_pixels_after"] <= 1280 * 32 * 32
            if modality != "image":
                assert r["original_tokens"] > 3000 and r["truncated"] and r["rows_dropped"] > 0  # employment-table01 is big
    assert answered >= 18, answered


def test_the_28_failed_rows_of_the_predecessor(tmp_path, tiny, data, env):
    db = f"sqlite:///{tmp_path / 'h.db'}"
    hitq("import-checkpoint", LEGACY, "--run", "mm", "--modality", "text", "--format", "markdown", "--data", data, "--model", tiny,
         "--max-input-tokens", "8000", "--db", db)
    assert "28 jobs re-queued" in hitq("requeue-errors", "--run", "mm", "--db", db).stdout
    hitq("work", "--gpu", "cpu", "--drain", "--batch-size", "4", "--poll-seconds", "0.1", "--db", db, env=env, timeout=600)
    original = {r["id"]: r for r in json.loads(LEGACY.read_text())["results"]}
    failed = {i for i, r in original.items() if r["Prediction"].startswith("[ERROR")}
    rows = {r["query_id"]: r for r in open_queue(db).result_rows("mm")}
    rerun = [rows[i] for i in sorted(failed)]
    done = [r for r in rerun if r["status"] == "done"]
    missing = [r for r in rerun if r["status"] == "error"]
    settled = [r for r in rerun if r["error_kind"] != "missing_input"]  # done, or bad_format from the tiny model
    assert len(settled) == 15 and len(missing) == 13 + len(settled) - len(done)
    assert {r["error_kind"] for r in missing} <= {"missing_input", "bad_format"}
    assert {r["file_name"] for r in missing if r["error_kind"] == "missing_input"} == {
        "agriculture-table06", "agriculture-table07", "agriculture-table06_swap"}
    assert all(r["truncated"] and r["input_tokens"] <= 8000 and r["original_tokens"] > 300_000 for r in settled)
    for i, r in rows.items():
        if i not in failed:
            assert (r["status"], r["prediction"], r["attempts"]) == ("done", original[i]["Prediction"], 0)
    # the question and the answer-format line survive truncation: look at the prompts themselves
    dump = tmp_path / "prompts"
    hitq("preflight", "--data", data, "--model", tiny, "--modality", "text", "--format", "markdown", "--ids",
         ",".join(str(r["query_id"]) for r in settled), "--max-input-tokens", "8000", "--dump", dump)
    for r in settled:
        text = (dump / f"{r['query_id']}.txt").read_text()
        assert r["question"] in text[-3000:] and "omitted] ..." in text and "[Final Answer]:" in text[-400:]


def test_oom_ladder_recovers_or_classifies(tmp_path, tiny, data, env):
    """keys=3 OOMs at every size: the batch is split, 3 ends as oom with the sizes tried; the
    rest of its batch succeeds. calls=1 OOMs once: the first batch is split and still succeeds."""
    db = f"sqlite:///{tmp_path / 'h.db'}"
    hitq("enqueue", "--data", data, "--model", tiny, "--modality", "mix", "--format", "csv", "--ids", "1-4",
         "--max-input-tokens", "3000", "--max-new-tokens", "16", "--engine-opt", "inject_oom=keys=3", "--run", "r", "--db", db)
    out = hitq("work", "--gpu", "cpu", "--drain", "--batch-size", "4", "--poll-seconds", "0.1", "--db", db, env=env, timeout=300)
    assert "OOM on a batch of 4: splitting" in out.stderr and "retrying with max_pixels" in out.stderr
    rows = {r["query_id"]: r for r in open_queue(db).result_rows("r")}
    assert [rows[i]["status"] for i in (1, 2, 4)] == ["done"] * 3
    assert rows[3]["status"] == "error" and rows[3]["error_kind"] == "oom"
    ladder = rows[3]["details"]["oom_ladder"]
    assert [s["max_input_tokens"] for s in ladder] == [3000, 1500, 750]
    assert ladder[0]["max_pixels"] > ladder[1]["max_pixels"] > ladder[2]["max_pixels"]
    assert "out of memory at every size tried" in rows[3]["error_message"]


def test_single_job_oom_then_smaller_succeeds(tmp_path, tiny, data, env):
    db = f"sqlite:///{tmp_path / 'h.db'}"
    hitq("enqueue", "--data", data, "--model", tiny, "--modality", "text", "--format", "html", "--ids", "1",
         "--max-input-tokens", "3000", "--max-new-tokens", "16", "--engine-opt", "inject_oom=calls=1", "--run", "r", "--db", db)
    hitq("work", "--gpu", "cpu", "--drain", "--poll-seconds", "0.1", "--db", db, env=env, timeout=300)
    (row,) = open_queue(db).result_rows("r")
    assert row["status"] == "done" and row["input_tokens"] <= 1500
    assert [s["error"] is None for s in row["details"]["oom_ladder"]] == [False, True]


@pytest.mark.parametrize("stream", ["false", "true"])
def test_format_retry_cap_and_oom_in_batches_and_streams(tmp_path, data, env, stream):
    """Format retries and the OOM ladder, in a batch and after a stream (run one at a time)."""
    db = f"sqlite:///{tmp_path / 'h.db'}"
    hitq("enqueue", "--data", data, "--modality", "text", "--format", "csv", "--ids", "1-4", "--engine", "fake",
         "--engine-opt", "noanswer=2", "--engine-opt", "oom=4", "--engine-opt", f"stream={stream}",
         "--format-retries", "2", "--run", "r", "--db", db)
    out = hitq("work", "--gpu", "cpu", "--drain", "--batch-size", "2", "--poll-seconds", "0.1", "--db", db, env=env)
    assert ("stream of 4:" in out.stderr) == (stream == "true")
    rows = {r["query_id"]: r for r in open_queue(db).result_rows("r")}
    assert rows[2]["status"] == "error" and rows[2]["error_kind"] == "bad_format"
    assert rows[2]["raw_output"].count("=== retry ===") == 2 and "after 3 tries" in rows[2]["error_message"]
    assert rows[4]["status"] == "error" and rows[4]["error_kind"] == "oom" and len(rows[4]["details"]["oom_ladder"]) == 3
    assert rows[1]["status"] == rows[3]["status"] == "done"


def test_fast_path_through_the_queue_gives_the_answers_of_generate(tmp_path, tiny, data, env):
    """One worker drains runs of the same queries: through model.generate, through the fast path
    as a stream (jobs claimed 4, then 1 at a time while rows decode; shared prefixes, continuous
    batching), and text once more with prefixes prefilled in 64-token chunks beside the decode
    steps (prefill_chunk); every raw output is the same."""
    db = f"sqlite:///{tmp_path / 'h.db'}"
    runs = [("slow", "text", []), ("slow", "mix", []), ("fast", "text", ["fast=true"]), ("fast", "mix", ["fast=true"]),
            ("chunked", "text", ["fast=true", "prefill_chunk=64"])]
    for name, modality, opts in runs:
        hitq("enqueue", "--data", data, "--model", tiny, "--modality", modality, "--format", "html", "--ids", "1-6",
             "--max-input-tokens", "3000", "--max-new-tokens", "24", "--format-retries", "0",
             "--run", f"{name}_{modality}", *[a for o in opts for a in ("--engine-opt", o)], "--db", db)
    out = hitq("work", "--gpu", "cpu", "--drain", "--batch-size", "4", "--poll-seconds", "0.1", "--db", db, env=env, timeout=600)
    log = out.stdout + out.stderr
    assert log.count("stream of 6:") == 3 and log.count("decode: 6 rows") == 3  # the fast path streamed each run
    assert re.search(r"decode: 6 rows.*\(([1-9]\d*) beside prefill chunks,", log)  # the chunked run mixed steps
    q = open_queue(db)
    for name, modality, _ in runs[2:]:
        slow = {r["query_id"]: r for r in q.result_rows(f"slow_{modality}")}
        fast = {r["query_id"]: r for r in q.result_rows(f"{name}_{modality}")}
        assert len(slow) == len(fast) == 6
        for i in slow:
            assert (fast[i]["raw_output"], fast[i]["status"]) == (slow[i]["raw_output"], slow[i]["status"]), (name, modality, i)
