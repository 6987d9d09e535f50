"""Preflight with the real Qwen3-VL tokenizer on the huge `_swap` html tables that OOM'd the
predecessor (realhitbench.md e): every prompt must fit the budget with the question intact."""
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark_fixtures import count_text_tokens, rhb_data  # noqa: E402,F401

from hitq.benchmark import preflight, prompts, qa, render, tables  # noqa: E402
from hitq.engine.base import ImageLimits, TokenCount  # noqa: E402
from hitq.errors import MissingInput  # noqa: E402
from hitq.runconfig import RunConfig  # noqa: E402

GIANT_IDS = "2747-2751,2758-2763,2966-2968,3019-3021"


def count_tokens(messages: list[dict], limits: ImageLimits) -> TokenCount:
    return TokenCount(count_text_tokens(messages))


@pytest.mark.slow
def test_giant_html_tables_fit_with_question_kept(rhb_data):
    queries = qa.select(qa.load_queries(str(rhb_data)), qa.parse_ids(GIANT_IDS), None)
    assert len(queries) == 17 and all(q.file_name.endswith("_swap") for q in queries)
    config = RunConfig(modality="text", format="html", data_dir=str(rhb_data), model_dir=None,
                       max_input_tokens=100_000)
    prompt_set = prompts.load_prompt_set("default")
    report = preflight.preflight(queries, config, prompt_set, count_tokens)
    by_id = {q.id: q for q in queries}
    for row in report["queries"]:
        assert row["error"] is None, row
        assert row["truncated"] and row["rows_dropped"] > 0
        assert 90_000 < row["input_tokens"] <= 100_000 < row["original_tokens"]
    summary = report["summary"]
    assert summary["n"] == summary["ok"] == summary["truncated"] == 17 and summary["errors"] == 0
    assert summary["max"] <= 100_000 and summary["max_original"] > 1_000_000  # agriculture-table06_swap

    q = by_id[2966]
    fitted = preflight.prepare_query(q, config, prompt_set, count_tokens)
    text = fitted.messages[0]["content"][0]["text"]
    assert count_text_tokens(fitted.messages) == fitted.input_tokens <= 100_000
    assert text.endswith("# Question\n" + q.question + "\nRemember: the final answer must be formatted like this: "
                         "[Final Answer]: AnswerName1, AnswerName2...\n")
    assert f"<tr><td>... [{fitted.rows_dropped} rows omitted] ...</td></tr>" in fitted.table
    assert fitted.table.rstrip().endswith("</html>")
    dumped = preflight.dump_prompt(fitted.messages)
    assert dumped.startswith("===== user =====\n") and q.question in dumped


def test_missing_inputs_are_job_errors(rhb_data):
    queries = qa.select(qa.load_queries(str(rhb_data)), {1, 2216, 2960}, None)
    config = RunConfig(modality="text", format="html", data_dir=str(rhb_data), model_dir=None)
    report = preflight.preflight(queries, config, prompts.load_prompt_set("default"), count_tokens)
    errors = {r["id"]: r["error"] for r in report["queries"]}
    assert errors[1] is None
    assert errors[2216].startswith("missing_input: html table labor-table68.html is missing")
    assert errors[2960].startswith("missing_input: html table society-table10_swap.html is missing")
    assert report["summary"]["errors_by_kind"] == {"missing_input": 2}
    image_config = RunConfig(modality="mix", format="csv", data_dir=str(rhb_data), model_dir=None)
    with pytest.raises(MissingInput, match="Git LFS pointer"):
        preflight.prepare_query(queries[0], image_config, prompts.load_prompt_set("default"), count_tokens)


def test_mix_prepare_records_image_pixels(rhb_data, tmp_path):
    """With a rendered stand-in image: image first, image pixels from the engine's TokenCount."""
    data = tmp_path / "data"
    (data / "csv").mkdir(parents=True)
    shutil.copy(tables.table_path(rhb_data, "csv", "employment-table01"), data / "csv")
    render.ensure_images(data, ["employment-table01"])
    seen = []

    def count_with_image(messages, limits):
        seen.append(limits)
        return TokenCount(count_text_tokens(messages) + 1000, image_pixels_before=12345, image_pixels_after=999,
                          image_tokens=1000)

    config = RunConfig(modality="mix", format="csv", data_dir=str(data), model_dir=None, max_input_tokens=3_000,
                       max_pixels=512 * 32 * 32)
    q = qa.load_queries(str(rhb_data))[0]
    f = preflight.prepare_query(q, config, prompts.load_prompt_set("default"), count_with_image)
    assert f.messages[0]["content"][0] == {"type": "image", "image": str(data / "image" / "employment-table01.png")}
    assert f.truncated and f.input_tokens <= 3_000 and f.token_count.tokens == f.input_tokens
    assert f.token_count.image_pixels_before == 12345
    assert seen[0] == ImageLimits(config.min_pixels, 512 * 32 * 32)
    assert "table in csv format, an image of the same table" in f.messages[0]["content"][1]["text"]
