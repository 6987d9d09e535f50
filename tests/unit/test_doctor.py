"""`hitq doctor`: one line per check, ok or FAIL with the reason, exit 1 when any check fails."""
from __future__ import annotations

import json
import os
import stat

import pytest
from click.testing import CliRunner

from hitq.benchmark.sample import write_sample
from hitq.cli.main import cli


def doctor(*args, env=None):
    result = CliRunner().invoke(cli, ["doctor", *map(str, args)], env=env)
    return result.exit_code, result.output


def line(output: str, check: str) -> str:
    return next(text for text in output.splitlines() if text[5:].split(" ", 1)[0] == check)


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["Qwen3VLForConditionalGeneration"]}))
    (d / "tokenizer.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"\0" * 1024)
    return d


@pytest.fixture
def no_gpu(tmp_path):
    """PATH without nvidia-smi."""
    return {"PATH": str(tmp_path / "empty-bin")}


@pytest.fixture
def fake_gpu(tmp_path):
    """PATH with an nvidia-smi that reports two GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81000, 81559'\necho 'NVIDIA H100 80GB HBM3, 1024, 81559'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_a_good_setup_passes(db_url, tmp_path, model_dir, fake_gpu):
    data = write_sample(tmp_path / "data", images=False)
    code, out = doctor("--db", db_url, "--model", model_dir, "--data", data, "--format", "csv", "--out", tmp_path / "results",
                       env=fake_gpu)
    assert code == 0, out
    assert [text[:4] for text in out.splitlines()] == ["ok  "] * 5
    assert "reachable" in line(out, "database")
    assert "Qwen3VLForConditionalGeneration, 1 weight file(s)" in line(out, "model")
    assert "2 GPU(s): 0: NVIDIA H100 80GB HBM3 79/80 GiB free; 1: NVIDIA H100 80GB HBM3 1/80 GiB free" in line(out, "gpu")
    assert "GiB free" in line(out, "disk")


def test_every_failure_is_named_and_exits_1(tmp_path, no_gpu):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    code, out = doctor("--db", "postgresql://hitq:pw@127.0.0.1:1/hitq", "--model", model, "--data", tmp_path / "nope",
                       "--require-gpu", env=no_gpu)
    assert code == 1
    assert line(out, "database").startswith("FAIL") and "cannot connect" in line(out, "database") and "pw" not in out
    assert line(out, "model").startswith("FAIL") and "LlamaForCausalLM" in line(out, "model")
    assert line(out, "data").startswith("FAIL") and "not found" in line(out, "data")
    assert line(out, "gpu").startswith("FAIL") and "no GPU visible" in line(out, "gpu")
    assert out.strip().splitlines()[-1] == "Error: 4 check(s) failed"


def test_no_gpu_is_fine_on_a_cpu_machine_unless_required(tmp_path, no_gpu):
    code, out = doctor("--db", tmp_path / "h.db", env=no_gpu)
    assert code == 0 and line(out, "gpu").startswith("ok") and "no GPU visible" in line(out, "gpu")


@pytest.mark.parametrize("breakage, reason", [
    ("no_tokenizer", "no tokenizer"), ("no_weights", "no weights"), ("lfs_weights", "Git LFS pointers"),
    ("bad_json", "unreadable"), ("no_config", "no config.json"),
])
def test_model_dir_problems(model_dir, tmp_path, no_gpu, breakage, reason):
    if breakage == "no_tokenizer":
        (model_dir / "tokenizer.json").unlink()
    elif breakage == "no_weights":
        (model_dir / "model.safetensors").unlink()
    elif breakage == "lfs_weights":
        (model_dir / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    elif breakage == "bad_json":
        (model_dir / "config.json").write_text("{")
    elif breakage == "no_config":
        (model_dir / "config.json").unlink()
    code, out = doctor("--db", tmp_path / "h.db", "--model", model_dir, env=no_gpu)
    assert code == 1 and line(out, "model").startswith("FAIL") and reason in line(out, "model"), out


def test_missing_tables_and_unmigrated_database(tmp_path, no_gpu):
    from hitq.jobqueue import database

    data = write_sample(tmp_path / "data", images=False)
    next((data / "csv").iterdir()).unlink()
    db = f"sqlite:///{tmp_path / 'h.db'}"
    database.upgrade(database.create(db))
    database.downgrade(database.create(db), "base")
    with database.create(db).begin() as conn:  # an old schema: a revision that is not the head
        conn.exec_driver_sql("DELETE FROM alembic_version")
        conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('0000')")
    code, out = doctor("--db", db, "--data", data, "--format", "csv", env=no_gpu)
    assert code == 1
    assert "hitq db upgrade" in line(out, "database")
    assert "csv table(s) missing" in line(out, "data")


def test_doctor_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    code = "import sys; from hitq.cli.main import cli; from hitq.cli import doctor; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
