"""The words a user sees: one-line errors with a non-zero exit, help with an example everywhere."""
from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from hitq.benchmark.sample import write_sample
from hitq.cli.main import cli


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sample(tmp_path_factory.mktemp("sample") / "data", images=False)


def run(*args, **kw):
    result = CliRunner().invoke(cli, [str(a) for a in args], **kw)
    return result.exit_code, result.output


def one_line_error(code, output, expected):
    assert code != 0
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("Error: "), output
    assert "Traceback" not in output
    assert expected in lines[-1], lines[-1]


def test_bench_refuses_engine_options_it_sets_itself(data):
    one_line_error(*run("bench", "--data", data, "--engine-opt", "fast=false"), "the bench sets device, fast")


def test_missing_data_dir(tmp_path):
    one_line_error(*run("enqueue", "--data", tmp_path / "nope", "--modality", "text", "--format", "html", "--engine", "fake"), "nope")


def test_qa_file_not_json(tmp_path, data):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    one_line_error(*run("enqueue", "--data", data, "--qa", bad, "--modality", "text", "--format", "html", "--engine", "fake"), "JSON")


def test_unknown_format_and_modality(data):
    one_line_error(*run("enqueue", "--data", data, "--modality", "text", "--format", "xlsx", "--engine", "fake"), "xlsx")
    one_line_error(*run("enqueue", "--data", data, "--modality", "audio", "--format", "html", "--engine", "fake"), "audio")


@pytest.mark.parametrize("spec", ["0..", "0..x", "3..1", "gpu0", "0,,1"])
def test_gpu_spec_typos(spec):
    one_line_error(*run("work", "--gpu", spec), "--gpu")


def test_unreachable_database():
    code, out = run("status", "--db", "postgresql://hitq:s3cret@127.0.0.1:1/hitq")
    one_line_error(code, out, "cannot connect to postgresql+psycopg://hitq:***@127.0.0.1:1/hitq")
    assert "s3cret" not in out


def test_model_dir_without_config(tmp_path, data):
    (tmp_path / "model").mkdir()
    one_line_error(*run("enqueue", "--data", data, "--model", tmp_path / "model", "--modality", "text", "--format", "html"), "no config.json")


def test_enqueue_same_run_other_settings_shows_the_diff(tmp_path, data):
    db = tmp_path / "h.db"
    code, out = run("enqueue", "--data", data, "--modality", "text", "--format", "html", "--engine", "fake", "--run", "x", "--db", db)
    assert code == 0 and "17 jobs added, 0 already present" in out
    code, out = run("enqueue", "--data", data, "--modality", "text", "--format", "html", "--engine", "fake", "--run", "x", "--db", db)
    assert code == 0 and "0 jobs added, 17 already present" in out
    one_line_error(*run("enqueue", "--data", data, "--modality", "text", "--format", "html", "--engine", "fake", "--run", "x",
                        "--max-input-tokens", "5000", "--db", db), "max_input_tokens: 100000 -> 5000")


def test_table_first_is_opt_in_and_labelled(tmp_path, data):
    from hitq.jobqueue import open_queue
    from hitq.runconfig import RunConfig

    db = tmp_path / "h.db"
    code, out = run("enqueue", "--data", data, "--modality", "text", "--format", "html", "--engine", "fake", "--table-first",
                    "--run", "tf", "--db", db)
    assert code == 0 and "(table-first prompt layout: not the default prompt)" in out
    run("enqueue", "--data", data, "--modality", "text", "--format", "html", "--engine", "fake", "--run", "plain", "--db", db)
    q = open_queue(f"sqlite:///{db}")
    assert RunConfig.from_json(q.get_run("tf").config).table_first and not RunConfig.from_json(q.get_run("plain").config).table_first
    for name, most in (("tf", 1), ("plain", 2)):  # keys per table: one (table-first) or one per template
        keys: dict = {}
        for r in q.result_rows(name):
            keys.setdefault(r["file_name"], set()).add(r["prefix_key"])
        assert max(len(k) for k in keys.values()) == 1 if most == 1 else max(len(k) for k in keys.values()) >= most
    code, out = run("status", "--db", db)
    assert "tf [table-first]" in out and "plain [table-first]" not in out
    one_line_error(*run("enqueue", "--data", data, "--modality", "text", "--format", "html", "--engine", "fake", "--table-first",
                        "--protocol", "predecessor", "--run", "tp", "--db", db), "--table-first is hitq's own layout")


def test_sqlite_on_network_filesystem(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text(f"server:/export {tmp_path} nfs4 rw 0 0\n")
    monkeypatch.setenv("HITQ_PROC_MOUNTS", str(mounts))
    one_line_error(*run("status", "--db", tmp_path / "h.db"), "network filesystem (nfs4)")


def test_missing_inputs_are_enqueued_as_errors(tmp_path, data):
    (data / "html" / "demo-table02.html").rename(tmp_path / "moved.html")
    try:
        code, out = run("enqueue", "--data", data, "--modality", "text", "--format", "html", "--engine", "fake", "--db", tmp_path / "h.db")
        assert code == 0 and "demo-table02 missing -> ids" in out
        code, out = run("status", "--json", "--db", tmp_path / "h.db")
        (status,) = json.loads(out)["runs"]
        assert status["errors"] == {"missing_input": 5} and status["counts"]["pending"] == 12
    finally:
        (tmp_path / "moved.html").rename(data / "html" / "demo-table02.html")


def all_commands(group=cli, prefix=()):
    for name, command in group.commands.items():
        yield prefix + (name,), command
        if isinstance(command, click.Group):
            yield from all_commands(command, prefix + (name,))


@pytest.mark.parametrize("path,command", list(all_commands()), ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_every_command_has_help_with_an_example(path, command):
    code, out = run(*path, "--help")
    assert code == 0
    assert "Example" in out, f"hitq {' '.join(path)} --help has no example"


def test_cli_import_does_not_import_torch():
    code = "import sys, hitq.cli.main; from hitq.cli.main import cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "hitq.cli.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "torch" not in out.stderr.split()
