"""Hostile input, fuzzed with hypothesis: the predecessor-checkpoint importer and the QA loader
(and `hitq enqueue` / `hitq import-checkpoint` on top of them) get malformed JSON, wrong types,
huge strings, non-UTF-8 bytes, duplicate ids and ids that collide across QA files.

Every case ends in a clear one-line error (exit 1, nothing written) or a complete success; never
a traceback, never a partial write. The example budget is bounded (HITQ_FUZZ_EXAMPLES, default
40 per property) so the suite stays fast in CI.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hitq.benchmark import qa
from hitq.benchmark.sample import write_sample
from hitq.cli.main import cli
from hitq.errors import DataError, HitqError
from hitq.jobqueue import checkpoint

EXAMPLES = int(os.environ.get("HITQ_FUZZ_EXAMPLES", 40))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow, HealthCheck.data_too_large])

# -- strategies ------------------------------------------------------------------------------------
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
nasty_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.sampled_from(["", " ", "\x00", "../../etc/passwd", "a/b", "\ud800", "[ERROR] OOM", "é" * 3, "\u202e", "x" * 200_000]),
)
wrong_type = st.none() | st.booleans() | st.floats(allow_nan=False) | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
TYPES = [("Fact Checking", "Value-Matching"), ("Numerical Reasoning", "Counting"), ("Data Analysis", "Summary Analysis")] * 3 + [
    ("Structure Comprehending", "Structure Comprehending")]
TABLES = ["demo-table01", "demo-table02", "demo-table03"]


@st.composite
def qa_rows(draw, min_size=0, max_size=8, ids=st.integers(1, 30)):
    """QA rows, mostly well-formed, with hostile values mixed in."""
    rows = []
    for _ in range(draw(st.integers(min_size, max_size))):
        qtype, sub = draw(st.sampled_from(TYPES))
        row = {"id": draw(ids), "FileName": draw(st.sampled_from(TABLES) | nasty_text), "Question": draw(nasty_text),
               "QuestionType": qtype, "SubQType": sub, "FinalAnswer": draw(nasty_text), "ProcessedAnswer": draw(nasty_text),
               "CompStrucCata": "x", "Source": "x", "COT": []}
        mutation = draw(st.sampled_from(["none"] * 15 + ["wrong_type", "missing", "extra"]))
        key = draw(st.sampled_from(sorted(qa.REQUIRED_KEYS)))
        if mutation == "wrong_type":
            row[key] = draw(wrong_type | (st.text(max_size=3) if key == "id" else st.integers()))
        elif mutation == "missing":
            del row[key]
        elif mutation == "extra":
            row[draw(st.text(max_size=10))] = draw(json_values)
        rows.append(row)
    return rows


@st.composite
def file_bytes(draw, documents):
    """A file's bytes: a JSON document, possibly truncated, corrupted with non-UTF-8 bytes, or junk."""
    doc = draw(documents)
    raw = json.dumps(doc, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    how = draw(st.sampled_from(["as_is"] * 5 + ["truncate", "bad_bytes", "junk", "bom"]))
    if how == "truncate" and raw:
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif how == "bad_bytes":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\x80\x80", b"\xed\xa0\x80"])) + raw[at:]
    elif how == "junk":
        raw = draw(st.binary(max_size=64))
    elif how == "bom":
        raw = b"\xef\xbb\xbf" + raw
    return raw


qa_documents = st.one_of(
    st.builds(lambda rows: {"queries": rows}, qa_rows()),
    st.builds(lambda rows: {"queries": rows + rows[:1]}, qa_rows(min_size=1)),  # a duplicate id
    json_values,
    st.builds(lambda v: {"queries": v}, json_values),
)


@st.composite
def checkpoint_rows(draw):
    rows = []
    for _ in range(draw(st.integers(0, 6))):
        row = {"id": draw(st.integers(1, 20)), "FileName": draw(st.sampled_from(TABLES) | nasty_text), "QuestionType": "Fact Checking",
               "SubQType": "Value-Matching", "Question": draw(nasty_text), "Reference": draw(nasty_text),
               "Prediction": draw(nasty_text | st.sampled_from(["[ERROR] CUDA out of memory", "[ERROR] timeout", "[ERROR]"])),
               "ProcessingTime": draw(st.floats(0, 100) | st.none())}
        mutation = draw(st.sampled_from(["none"] * 12 + ["wrong_type", "missing"]))
        key = draw(st.sampled_from(list(checkpoint.ROW_KEYS) + ["ProcessingTime"]))
        if mutation == "wrong_type":
            row[key] = draw(wrong_type | st.integers() | st.text(max_size=3))
        elif mutation == "missing":
            row.pop(key, None)
        rows.append(row)
    return rows


checkpoint_documents = st.one_of(
    st.builds(lambda rows: {"results": rows, "processed_ids": [r.get("id") for r in rows]}, checkpoint_rows()),
    json_values,
    st.builds(lambda v: {"results": v}, json_values),
)


# -- helpers ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample(tmp_path_factory.mktemp("fuzz") / "data", images=False)


class Scratch:
    """A fresh directory (data copy + database) per hypothesis example: function-scoped fixtures
    are shared between examples."""

    def __init__(self, sample: Path):
        self.dir = Path(tempfile.mkdtemp(prefix="hitq-fuzz-"))
        self.data = self.dir / "data"
        shutil.copytree(sample, self.data)
        self.db = f"sqlite:///{self.dir / 'hitq.db'}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.dir, ignore_errors=True)

    def counts(self) -> tuple[int, int, int]:
        """(runs, jobs, events) in the database (0s when it was never created)."""
        if not (self.dir / "hitq.db").exists():
            return (0, 0, 0)
        engine = sa.create_engine(self.db)
        try:
            with engine.connect() as conn:
                if not sa.inspect(conn).has_table("runs"):
                    return (0, 0, 0)
                return tuple(conn.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar() for t in ("runs", "jobs", "events"))
        finally:
            engine.dispose()


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a crash, not a handled error: fail with its traceback
    return result.exit_code, result.output


def assert_clear_error(code: int, output: str) -> None:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert code == 1, output
    assert lines and lines[-1].startswith("Error: "), output
    assert "Traceback" not in output and not lines[-1].startswith("Error: unexpected "), lines[-1]  # a handled, named error
    assert len(lines[-1]) < 2000, "an error message that echoes a huge input"


# -- the loader and the importer, as functions -----------------------------------------------------
@FUZZ
@given(raw=file_bytes(qa_documents))
def test_qa_loader_returns_queries_or_a_data_error(raw, tmp_path):
    path = tmp_path / "QA_final.json"
    path.write_bytes(raw)
    try:
        queries = qa.load_queries(str(tmp_path), None, "gold")
    except (DataError, HitqError) as e:
        assert str(e) and "\n" not in str(e)
        return
    assert len({q.id for q in queries}) == len(queries)
    assert all(isinstance(q.id, int) and isinstance(q.question, str) for q in queries)


@FUZZ
@given(raw=file_bytes(checkpoint_documents))
def test_checkpoint_reader_returns_rows_or_a_data_error(raw, tmp_path):
    path = tmp_path / "checkpoint.json"
    path.write_bytes(raw)
    try:
        rows = checkpoint.read_checkpoint(path)
    except DataError as e:
        assert str(e)
        return
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        fields = checkpoint.imported_result(row)
        assert fields["status"] in ("done", "error")
        if fields["status"] == "error":
            assert fields["error_kind"] in ("oom", "bad_format", "missing_input", "bad_input", "timeout", "engine_error")


# -- the commands: a clear error and nothing written, or everything written ----------------------------
@FUZZ
@given(raw=file_bytes(qa_documents))
def test_enqueue_hostile_qa_file(raw, sample):
    with Scratch(sample) as s:
        (s.data / "QA_final.json").write_bytes(raw)
        code, out = invoke("enqueue", "--data", s.data, "--modality", "text", "--format", "csv", "--engine", "fake", "--run", "r", "--db", s.db)
        if code != 0:
            assert_clear_error(code, out)
            assert s.counts()[:2] == (0, 0), "a failed enqueue wrote rows"
            return
        queries = qa.load_queries(str(s.data), None, "gold")
        runs, jobs, events = s.counts()
        assert (runs, jobs, events) == (1, len(queries), len(queries))


@FUZZ
@given(raw=file_bytes(checkpoint_documents))
def test_import_hostile_checkpoint(raw, sample):
    with Scratch(sample) as s:
        path = s.dir / "checkpoint.json"
        path.write_bytes(raw)
        code, out = invoke("import-checkpoint", path, "--run", "old", "--modality", "text", "--format", "csv", "--db", s.db)
        if code != 0:
            assert_clear_error(code, out)
            assert s.counts()[:2] == (0, 0), "a failed import wrote rows"
            return
        rows = checkpoint.read_checkpoint(path)
        assert s.counts()[:2] == (1, len(rows))


@FUZZ
@given(first=qa_rows(min_size=1, ids=st.integers(1, 6)), second=qa_rows(min_size=1, ids=st.integers(1, 6)),
       same_name=st.booleans())
def test_ids_colliding_across_qa_files(first, second, same_name, sample):
    """Two QA files whose ids overlap, enqueued into one run: the second either adds only new ids
    (the overlapping ones being the very same queries) or is refused whole, with a clear error."""
    with Scratch(sample) as s:
        dedup = lambda rows: list({r.get("id") if isinstance(r.get("id"), int) else repr(r.get("id")): r for r in rows}.values())
        (s.data / "QA_final.json").write_text(json.dumps({"queries": dedup(first)}))
        (s.data / ("QA_final.json" if same_name else "QA_other.json")).parent.mkdir(exist_ok=True)
        code, out = invoke("enqueue", "--data", s.data, "--modality", "text", "--format", "csv", "--engine", "fake", "--run", "r", "--db", s.db)
        if code != 0:
            assert_clear_error(code, out)
            return
        before = s.counts()
        old = {q.id: q for q in qa.load_queries(str(s.data), None, "gold")}
        name = "QA_final.json" if same_name else "QA_other.json"
        (s.data / name).write_text(json.dumps({"queries": dedup(second)}))
        code, out = invoke("enqueue", "--data", s.data, "--qa", s.data / name, "--modality", "text", "--format", "csv", "--engine", "fake",
                           "--run", "r", "--db", s.db)
        if code != 0:
            assert_clear_error(code, out)
            assert s.counts() == before, "a refused enqueue changed the run"
            return
        new = {q.id: q for q in qa.load_queries(str(s.data), str(s.data / name), "gold")}
        for i in set(old) & set(new):
            assert (old[i].question, old[i].file_name, old[i].reference) == (new[i].question, new[i].file_name, new[i].reference)
        assert s.counts()[1] == len(set(old) | set(new))
