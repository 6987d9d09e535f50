"""A failed export never damages the previous one: disk full (ENOSPC) or a read-only directory
(EROFS) while `hitq export` writes leaves checkpoint.json and results.json byte-identical, as a
pair, with no temp files behind, and a one-line error.

Two ways in: the real thing (a 1 MiB tmpfs, filled up, then remounted read-only; needs root and
mount, skipped otherwise — tests run as root, where chmod 555 stops nothing) and injected OSErrors
at each system call of the write path (runs everywhere).
"""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from hitq.benchmark.sample import write_sample
from hitq.cli.main import cli
from hitq.jobqueue import open_queue


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture
def queue(tmp_path):
    """A run with 6 jobs, 2 of them done."""
    data = write_sample(tmp_path / "data", images=False)
    db = f"sqlite:///{tmp_path / 'hitq.db'}"
    code, out = run("enqueue", "--data", data, "--modality", "text", "--format", "csv", "--engine", "fake", "--run", "r", "--db", db)
    assert code == 0, out
    q = open_queue(db)
    for job in q.claim("w", 2, 60):
        q.finish(job, "w", {"prediction": f"answer {job.query_id}"})
    return db, q


def progress(q, n=2):
    """More results, so that the next export differs from the previous one."""
    for job in q.claim("w", n, 60):
        q.finish(job, "w", {"prediction": "x" * 4000})


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def assert_intact(code, output, out: Path, before: dict[str, bytes], reason: str):
    assert code == 1, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("Error: cannot write ") and reason in last and "previous files are unchanged" in last, last
    assert snapshot(out) == before  # same names (no temp files left) and the same bytes


@pytest.mark.parametrize("call, err", [
    ("fsync", errno.ENOSPC), ("write", errno.ENOSPC), ("replace", errno.EROFS), ("mkstemp", errno.EROFS),
    ("second_fsync", errno.ENOSPC),  # checkpoint.json staged fine, results.json does not fit
])
def test_injected_write_failure_keeps_the_previous_export(queue, tmp_path, monkeypatch, call, err):
    db, q = queue
    out = tmp_path / "out"
    assert run("export", "--run", "r", "--out", out, "--db", db)[0] == 0
    before = snapshot(out)
    progress(q)
    import hitq.fileio as fileio

    def fail(*_a, **_k):
        raise OSError(err, os.strerror(err))

    if call == "fsync":
        monkeypatch.setattr(fileio.os, "fsync", fail)
    elif call == "second_fsync":
        real, calls = fileio.os.fsync, []

        def second(fd):
            calls.append(fd)
            return fail() if len(calls) == 2 else real(fd)

        monkeypatch.setattr(fileio.os, "fsync", second)
    elif call == "write":
        real_fdopen = fileio.os.fdopen

        def fdopen(fd, mode="r", *a, **k):
            f = real_fdopen(fd, mode, *a, **k)

            class Full:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    f.close()

                def write(self, data):
                    f.write(data[:100])
                    fail()

                def __getattr__(self, name):
                    return getattr(f, name)

            return Full()

        monkeypatch.setattr(fileio.os, "fdopen", fdopen)
    elif call == "replace":
        monkeypatch.setattr(fileio.os, "replace", fail)
    elif call == "mkstemp":
        monkeypatch.setattr(fileio.tempfile, "mkstemp", fail)
    code, output = run("export", "--run", "r", "--out", out, "--db", db)
    assert_intact(code, output, out, before, os.strerror(err))
    monkeypatch.undo()
    assert run("export", "--run", "r", "--out", out, "--db", db)[0] == 0  # and with room again, it works
    assert snapshot(out) != before


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 1 MiB tmpfs (root and mount needed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_disk_full_and_read_only_directory(queue, tiny_fs):
    db, q = queue
    out = tiny_fs / "out"
    assert run("export", "--run", "r", "--out", out, "--db", db)[0] == 0
    before = snapshot(out)
    # Fill the disk, leaving less than the next export needs.
    filler = tiny_fs / "filler"
    try:
        with open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError as e:
        assert e.errno == errno.ENOSPC
    progress(q, 4)
    code, output = run("export", "--run", "r", "--out", out, "--db", db)
    assert_intact(code, output, out, before, "No space left on device")
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    code, output = run("export", "--run", "r", "--out", out, "--db", db)
    assert_intact(code, output, out, before, "Read-only file system")
