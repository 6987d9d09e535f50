import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark_fixtures import RHB, chat_text, rhb_data  # noqa: E402,F401

from hitq.benchmark import prompts, qa  # noqa: E402
from hitq.errors import UsageError  # noqa: E402

OFFICIAL = RHB / "prompts-official.json"
EXT = {"html": "html", "markdown": "md", "latex": "txt", "csv": "csv", "json": "json"}


@pytest.fixture(scope="module")
def queries(rhb_data):
    return {q.id: q for q in qa.load_queries(str(rhb_data))}


@pytest.fixture(scope="module")
def official():
    return prompts.load_prompt_set(str(OFFICIAL))


def sample_ids(queries) -> list[int]:
    """The first two ids of each of the 9 template keys plus the odd rows named in realhitbench.md d,
    a BOM html table (id 1000 area), a non-UTF-8 latex table (labor-table54) and an SC row."""
    ids: list[int] = []
    for key in prompts.TEMPLATE_KEYS:
        ids += [q.id for q in queries.values() if q.template_key == key][:2]
    ids += [2193, 2294, 1000, 2749, 2702]
    ids += [q.id for q in queries.values() if q.file_name == "labor-table54"][:1]
    return sorted(set(ids))


# --- the predecessor's assembly, rewritten from the literal strings of realhitbench.md section d ---
def predecessor_user_text(row, modality, fmt, data_dir, official_json):
    key = row.sub_q_type if row.question_type == "Data Analysis" else row.question_type
    if row.sub_q_type == "Exploratory Analysis":
        answer_format = "CorrelationRelation, CorrelationCoefficient"
    elif row.question_type == "Visualization":
        answer_format = "import pandas as pd \n import matplotlib.pyplot as plt \n ... plt.show()"
    else:
        answer_format = "AnswerName1, AnswerName2..."
    task = official_json["task_prompts"][modality][key]
    if modality == "text":
        task = task.format(format=fmt)
    if modality == "image":
        table = "[See the table image]"
    else:
        with open(f"{data_dir}/{fmt}/{row.file_name}.{EXT[fmt]}", "r", encoding="utf-8", errors="ignore") as f:
            table = f.read()
    user = (" \nLet's get start! \n# Table\n" + table + "\n# Question\n" + row.question
            + "\nEmphasize: you need to make sure your final answer is formatted in this way: [Final Answer]: "
            + answer_format + "\n")
    return task + "\n" + user


def predecessor_messages(row, modality, fmt, data_dir, official_json):
    text = predecessor_user_text(row, modality, fmt, data_dir, official_json)
    if modality == "text":
        return [{"role": "user", "content": [{"type": "text", "text": text}]}]
    image = f"{data_dir}/image/{row.file_name}.png"
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


CASES = [("text", f) for f in EXT] + [("mix", "markdown"), ("mix", "latex"), ("mix", "html"), ("mix", "csv"),
                                      ("image", "html")]


@pytest.mark.parametrize("modality, fmt", CASES)
def test_predecessor_protocol_is_byte_identical(rhb_data, queries, official, modality, fmt):
    official_json = json.loads(OFFICIAL.read_text(encoding="utf-8"))
    data = str(rhb_data)
    checked = 0
    for i in sample_ids(queries):
        q = queries[i]
        if not (rhb_data / fmt / f"{q.file_name}.{EXT[fmt]}").is_file() and modality != "image":
            continue
        image = f"{data}/image/{q.file_name}.png"
        table = None if modality == "image" else open(f"{data}/{fmt}/{q.file_name}.{EXT[fmt]}", encoding="utf-8",
                                                       errors="ignore").read()
        got = prompts.build_messages(q, table, modality, fmt, official, "predecessor",
                                     image=None if modality == "text" else image)
        assert got == predecessor_messages(q, modality, fmt, data, official_json), (i, modality, fmt)
        checked += 1
    assert checked >= 18


def test_mix_predecessor_says_latex_and_corrected_says_format(queries, official):
    q = queries[1]
    pred = prompts.build_messages(q, "T", "mix", "csv", official, "predecessor", image="x.png")
    corr = prompts.build_messages(q, "T", "mix", "csv", official, "corrected", image="x.png")
    kept = prompts.build_messages(q, "T", "mix", "csv", official, "corrected", image="x.png", mix_says_latex=True)
    assert "a table in latex format with corresponding image" in pred[0]["content"][1]["text"]
    assert "a table in csv format with corresponding image" in corr[0]["content"][1]["text"]
    assert "latex" not in corr[0]["content"][1]["text"]
    assert kept == pred
    default = prompts.load_prompt_set("default")
    text = prompts.build_messages(q, "T", "mix", "json", default, "corrected", image="x.png")[0]["content"][1]["text"]
    assert "table in json format" in text and "{format}" not in text


def test_official_layouts(queries, official):
    q = queries[1]
    text = prompts.build_messages(q, "TBL {question}", "text", "html", official, "official")
    assert [m["role"] for m in text] == ["user", "assistant", "user"]
    assert text[0]["content"][0]["text"] == official.task_prompts["text"]["Fact Checking"].replace("{format}", "html")
    assert text[1]["content"][0]["text"] == "\nGot it! Please provide the table in csv format along with the question.\n"
    assert text[2]["content"][0]["text"].startswith(" \nLet's get start! \n# Table\nTBL {question}\n# Question\n")
    image = prompts.build_messages(q, "TBL", "image", "latex", official, "official", image="p.png")
    assert [p["type"] for p in image[0]["content"]] == ["text", "image"]  # text first
    assert "\n# Table\nTBL\n" in image[0]["content"][0]["text"]  # the text table, not the placeholder
    mix = prompts.build_messages(q, "TBL", "mix", "html", official, "official", image="p.png")
    assert "table in latex format" in mix[0]["content"][0]["text"]


def test_builder_reuses_everything_but_the_table(queries, official):
    q = queries[2749]
    build = prompts.prompt_builder(q, "text", "html", official, "predecessor")
    a, b = build("A"), build("B {table} {answer_format}")
    ta, tb = a[0]["content"][0]["text"], b[0]["content"][0]["text"]
    assert ta.replace("\n# Table\nA\n", "\n# Table\nB {table} {answer_format}\n") == tb  # no re-scan
    assert ta.endswith("# Question\n" + q.question + "\nEmphasize: you need to make sure your final answer is "
                       "formatted in this way: [Final Answer]: AnswerName1, AnswerName2...\n")


def test_chat_template_rendering(queries, official):
    q = queries[1]
    text_msgs = prompts.build_messages(q, "T", "text", "csv", official, "predecessor")
    user_text = text_msgs[0]["content"][0]["text"]
    assert chat_text(text_msgs) == "<|im_start|>user\n" + user_text + "<|im_end|>\n<|im_start|>assistant\n"
    img_msgs = prompts.build_messages(q, None, "image", "csv", official, "predecessor", image="x.png")
    img_text = img_msgs[0]["content"][1]["text"]
    assert chat_text(img_msgs) == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + img_text
                                   + "<|im_end|>\n<|im_start|>assistant\n")
    off = prompts.build_messages(q, "T", "text", "csv", official, "official")
    strings = [{"role": m["role"], "content": m["content"][0]["text"]} for m in off]
    assert chat_text(off) == chat_text(strings)  # content lists render like the official plain strings
    assert chat_text(off).count("<|im_start|>") == 4


def test_answer_format_rules(queries, official):
    by_key = {}
    for q in queries.values():
        by_key.setdefault((q.question_type, q.sub_q_type), q)
    expl = by_key[("Data Analysis", "Exploratory Analysis")]
    viz = by_key[("Visualization", "BarChart Generation")]
    assert official.answer_format(expl) == "CorrelationRelation, CorrelationCoefficient"
    assert official.answer_format(viz).count("\n") == 2
    assert prompts.answer_format(viz) == official.answer_format(viz)
    assert official.answer_format(queries[1]) == "AnswerName1, AnswerName2..."
    assert queries[2193].template_key == "Fact Checking" and queries[2294].template_key == "Fact Checking"


def test_load_prompt_sets(tmp_path):
    default = prompts.load_prompt_set("default")
    raw = (Path(prompts.__file__).parent / "prompts_default.json").read_bytes()
    assert default.sha256 == hashlib.sha256(raw).hexdigest()
    assert set(default.task_prompts) == {"text", "mix", "image"}
    assert all("{format}" in t for t in default.task_prompts["text"].values())
    with pytest.raises(UsageError, match="--prompts FILE"):
        prompts.load_prompt_set("official", str(tmp_path))
    shutil.copy(OFFICIAL, tmp_path / "prompts-official.json")
    off = prompts.load_prompt_set("official", str(tmp_path))
    assert off.sha256 == hashlib.sha256(OFFICIAL.read_bytes()).hexdigest() != default.sha256
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"task_prompts": {"text": {}}}))
    with pytest.raises(UsageError, match="task_prompts.text lacks Fact Checking"):
        prompts.load_prompt_set(str(bad))
    with pytest.raises(UsageError, match="not found"):
        prompts.load_prompt_set(str(tmp_path / "nope.json"))


def test_reminder_and_generation_limits(queries, official):
    q = queries[1]
    msgs = prompts.build_messages(q, "T", "mix", "csv", official, "predecessor", image="x.png")
    again = prompts.reminder(msgs, "AnswerName1, AnswerName2...")
    assert again[0]["content"][0] == msgs[0]["content"][0]  # the image part is untouched
    assert again[0]["content"][1]["text"] == msgs[0]["content"][1]["text"] + (
        '\nNote: Please check your output format. You do not need to do much explaining, just give the final '
        'answer in the given format: "[Final Answer]: AnswerName1, AnswerName2...')
    assert "check your output format" not in msgs[0]["content"][1]["text"]  # input not modified
    viz = next(x for x in queries.values() if x.question_type == "Visualization")
    summary = next(x for x in queries.values() if x.sub_q_type == "Summary Analysis")
    assert prompts.is_open_ended(viz) and not prompts.is_open_ended(summary) and not prompts.is_open_ended(q)
    assert prompts.default_max_new_tokens(viz) > prompts.default_max_new_tokens(summary) > \
        prompts.default_max_new_tokens(q)
    with pytest.raises(UsageError):
        prompts.build_messages(q, "T", "text", "xml", official, "predecessor")
    with pytest.raises(UsageError):
        prompts.build_messages(q, "T", "text", "csv", official, "other")


def test_table_first_layout_shares_the_table_across_templates(queries):
    """Opt-in: the table precedes the task text, so questions of different templates on one table
    share their prompt (image and table) up to the end of the table, and one prefix_key."""
    from hitq.benchmark.query import job_row

    default = prompts.load_prompt_set("default")
    table = "<table><tr><td>1</td></tr></table>"
    on_table: dict = {}
    for q in queries.values():
        on_table.setdefault(q.file_name, {}).setdefault(q.template_key, q)
    name, by_template = next((n, t) for n, t in on_table.items() if len(t) >= 3)
    picked = list(by_template.values())[:3]
    for modality, image in (("text", None), ("mix", "x.png")):
        texts = [prompts.build_messages(q, table, modality, "html", default, image=image, table_first=True)
                 for q in picked]
        bodies = [m[0]["content"][-1]["text"] for m in texts]
        assert all(b.startswith("# Table\n" + table + "\n") for b in bodies)
        assert len({b.split(table)[0] for b in bodies}) == 1 and len(set(bodies)) == 3  # shared up to the table only
        assert all(b.endswith(q.question + "\nRemember: the final answer must be formatted like this: [Final Answer]: "
                              + default.answer_format(q) + "\n") for b, q in zip(bodies, picked))
        if image:
            assert all(m[0]["content"][0] == {"type": "image", "image": "x.png"} for m in texts)
        default_body = prompts.build_messages(picked[0], table, modality, "html", default, image=image)[0]["content"][-1]["text"]
        assert default_body.index(table) > default_body.index("# Role")  # the default puts the task first
    keys = {job_row(q, "text", "html", table_first=True)["prefix_key"] for q in picked}
    assert len(keys) == 1 and len({job_row(q, "text", "html")["prefix_key"] for q in picked}) == 3
    with pytest.raises(UsageError, match="table-first"):
        prompts.build_messages(picked[0], table, "text", "html", default, "predecessor", table_first=True)


def test_chart_groups_are_claimed_first(queries):
    """job_rows: every job of a prefix group holding a Visualization question has priority 1 (the
    claim's first key), in both layouts; the rest 0; missing inputs keep their error row."""
    from hitq.benchmark.query import job_rows

    sample = [q for q in queries.values() if q.file_name in {q.file_name for q in queries.values()
                                                                if q.question_type == "Visualization"}][:60]
    for table_first in (False, True):
        rows = job_rows(sample, "text", "html", {sample[0].id: "table missing"}, table_first)
        charts = {r["prefix_key"] for r in rows if r["question_type"] == "Visualization"}
        assert charts and all(r["priority"] == (r["prefix_key"] in charts) for r in rows)
        assert any(r["priority"] == 0 for r in rows) and rows[0]["error_kind"] == "missing_input"
        if table_first:  # the whole table is one group: its other questions come first too
            assert any(r["priority"] == 1 and r["question_type"] != "Visualization" for r in rows)
