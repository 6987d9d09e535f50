import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark_fixtures import rhb_data  # noqa: E402,F401

from hitq.benchmark import qa, tables  # noqa: E402
from hitq.errors import DataError, MissingInput, UsageError  # noqa: E402


@pytest.fixture(scope="module")
def queries(rhb_data):
    return qa.load_queries(str(rhb_data))


def test_load_counts_and_reference(queries):
    assert len(queries) == 3071
    assert [q.id for q in queries] == list(range(1, 3072))
    viz = [q for q in queries if q.question_type == "Visualization"]
    assert len(viz) == 154
    assert all(q.reference == q.processed_answer for q in viz)
    assert all(q.reference == q.final_answer for q in queries if q.question_type != "Visualization")
    q374 = queries[373]
    assert (q374.final_answer, q374.processed_answer, q374.reference) == ("1297800", "31297800", "1297800")


def test_sc_derivation_matches_filled_file(rhb_data, queries):
    filled = qa.load_queries(str(rhb_data), "QA_final_sc_filled.json", sc_protocol="none")
    assert queries == filled
    sc = [q for q in queries if q.question_type == "Structure Comprehending"]
    assert len(sc) == 396
    assert all(q.file_name.endswith("_swap") and q.reference for q in sc)


def test_sc_derivation_byte_identical(rhb_data):
    rows = json.loads((rhb_data / "QA_final.json").read_text(encoding="utf-8"))["queries"]
    derived = qa.derive_sc(rows)
    text = json.dumps({"queries": derived}, indent=4, ensure_ascii=False)
    assert text.encode("utf-8") == (rhb_data / "QA_final_sc_filled.json").read_bytes()
    assert rows[2700]["FinalAnswer"] == ""  # input rows are not mutated


def test_filled_file_loads_identically_with_gold(rhb_data, queries):
    assert qa.load_queries(str(rhb_data), "QA_final_sc_filled.json") == queries


def test_sc_protocol_none_leaves_rows(rhb_data):
    raw = qa.load_queries(str(rhb_data), sc_protocol="none")
    sc = raw[2675]
    assert sc.question_type == "Structure Comprehending"
    assert not sc.file_name.endswith("_swap") and sc.reference == ""


def _write(tmp_path, data, name="qa.json"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return p


ROW = {"id": 1, "FileName": "t", "Question": "q", "QuestionType": "Fact Checking", "SubQType": "",
       "FinalAnswer": "a", "ProcessedAnswer": "a"}


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ({"rows": []}, 'no "queries" list'),
        ({"queries": [{k: v for k, v in ROW.items() if k != "Question"}]}, "lacks key(s) Question"),
        ({"queries": [{**ROW, "id": "1"}]}, "id must be int"),
        ({"queries": [{**ROW, "id": True}]}, "id must be int"),
        ({"queries": [ROW, ROW]}, "duplicate id 1"),
        ({"queries": [{**ROW, "QuestionType": "Structure Comprehending"}]}, "has no non-SC row"),
    ],
)
def test_bad_qa_files(tmp_path, content, message):
    p = _write(tmp_path, content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
        qa.load_queries(str(tmp_path), p.name)
    assert "\n" not in str(exc.value)


def test_missing_dir_and_file(tmp_path):
    with pytest.raises(DataError, match="dataset directory not found"):
        qa.load_queries(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="QA file not found"):
        qa.load_queries(str(tmp_path))
    with pytest.raises(UsageError):
        qa.load_queries(str(tmp_path), sc_protocol="maybe")


def test_absolute_qa_path(tmp_path):
    p = _write(tmp_path, {"queries": [ROW]})
    (tmp_path / "data").mkdir()
    [q] = qa.load_queries(str(tmp_path / "data"), str(p))
    assert (q.id, q.file_name, q.reference, q.template_key) == (1, "t", "a", "Fact Checking")


def test_parse_ids():
    assert qa.parse_ids("1-4,2747") == {1, 2, 3, 4, 2747}
    assert qa.parse_ids(" 7 ") == {7}
    for bad in ["5-", "a", "3-1", "", "1,,2", "-3"]:
        with pytest.raises(UsageError):
            qa.parse_ids(bad)


def test_select(queries):
    assert [q.id for q in qa.select(queries, {1, 2, 3000}, None)] == [1, 2, 3000]
    ranking = qa.select(queries, None, ["Ranking"])
    assert len(ranking) == 4 + 105  # SubQType of Fact Checking and of Numerical Reasoning
    assert len(qa.select(queries, None, ["visualization", "Counting"])) == 154 + 205
    assert [q.id for q in qa.select(queries, set(range(2670, 2680)), ["Structure Comprehending"])] == list(
        range(2676, 2680))
    with pytest.raises(UsageError, match="valid: .*Fact Checking"):
        qa.select(queries, None, ["Fact Check"])


def test_paths_and_reading(rhb_data):
    assert tables.table_path(rhb_data, "latex", "x") == rhb_data / "latex" / "x.txt"
    assert tables.image_path(rhb_data, "x") == rhb_data / "image" / "x.png"
    assert tables.xlsx_path(rhb_data, "x") == rhb_data / "tables" / "x.xlsx"
    with pytest.raises(UsageError):
        tables.table_path(rhb_data, "xml", "x")
    with pytest.raises(MissingInput, match=r"^html table labor-table68.html is missing: "):
        tables.read_table(rhb_data, "html", "labor-table68")
    with pytest.raises(MissingInput, match=r"is a Git LFS pointer \(real size 23695899 bytes\), not the table"):
        tables.read_table(rhb_data, "markdown", "agriculture-table06")
    with pytest.raises(MissingInput, match="image employment-table01.png is a Git LFS pointer") as exc:
        tables.check_image(rhb_data, "employment-table01")
    assert exc.value.kind == "missing_input"
    assert tables.is_lfs_pointer(rhb_data / "image" / "employment-table01.png")
    assert not tables.is_lfs_pointer(rhb_data / "csv" / "employment-table01.csv")


def test_reader_semantics(rhb_data):
    """BOM kept, CRLF translated, undecodable latex bytes dropped (realhitbench.md b)."""
    boms = [p for p in sorted((rhb_data / "html").glob("*.html")) if p.read_bytes()[:3] == b"\xef\xbb\xbf"]
    assert boms
    assert tables.read_table(rhb_data, "html", boms[0].stem)[0] == "\ufeff"
    raw = (rhb_data / "latex" / "labor-table54.txt").read_bytes()
    text = tables.read_table(rhb_data, "latex", "labor-table54")
    assert "\r" not in text
    assert text == raw.decode("utf-8", errors="ignore").replace("\r\n", "\n").replace("\r", "\n")


def test_validate_inputs(rhb_data, queries):
    rep = tables.validate_inputs(rhb_data, queries, "text", "markdown")
    assert set(rep) == {"markdown"}
    md = rep["markdown"]
    assert md["agriculture-table07"]["problem"] == "missing"
    assert md["agriculture-table06_swap"] == {
        "problem": "lfs_pointer", "path": str(rhb_data / "markdown" / "agriculture-table06_swap.md"),
        "real_bytes": 23655044, "ids": [2966, 2967, 2968]}
    assert tables.bad_ids(rep) == set(range(2016, 2026)) | {2960, 2961, 2962, 2966, 2967, 2968}
    assert tables.bad_ids(tables.validate_inputs(rhb_data, queries, "text", "latex")) == {2960, 2961, 2962}
    mix = tables.validate_inputs(rhb_data, queries, "mix", "html")
    assert set(mix) == {"html", "image"} and len(tables.bad_ids(mix)) == 3071  # every PNG is a pointer
    assert set(tables.validate_inputs(rhb_data, queries, "image", "html")) == {"image"}
    assert set(tables.validate_inputs(rhb_data, queries, "image", "html", protocol="official")) == {"html", "image"}
