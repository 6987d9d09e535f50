"""Secrets never leak: a database password in --db / HITQ_DB and the judge API key
(HITQ_JUDGE_API_KEY) appear in no output, log, error message, status, export or stored row.
PostgreSQL here uses trust authentication, so a URL with any password connects: the real
commands run end to end with a password in the URL, then everything they left is searched."""
from __future__ import annotations

import json
import os
import sqlite3

import click
import pytest
import sqlalchemy as sa

from hitq.cli.main import cli
from hitq.jobqueue.database import mask, normalize_url, scrub
from tests.acceptance.conftest import hitq, write_many
from tests.acceptance.faults import worker_pids
from tests.conftest import _new_pg_database

PASSWORD = "Pw-0f-7he-D4tabase"
API_KEY = "sk-judge-9f8e7d6c5b4a"


@pytest.fixture
def env():
    return dict(os.environ, PYTHONUNBUFFERED="1")


@pytest.fixture
def secret_url(pg_admin_url):
    """A fresh PostgreSQL database, addressed with a password in its URL."""
    if pg_admin_url is None:
        pytest.skip("PostgreSQL not reachable (set HITQ_TEST_POSTGRES_URL)")
    url = _new_pg_database(pg_admin_url)
    scheme, rest = url.split("://", 1)
    user_host = rest.split("@", 1)
    assert len(user_host) == 2, "the admin URL needs a user"
    return f"{scheme}://{user_host[0].split(':')[0]}:{PASSWORD}@{user_host[1]}"


def test_mask_and_scrub():
    url = f"postgresql://hitq:{PASSWORD}@db.example/hitq"
    assert PASSWORD not in mask(normalize_url(url)) and "***" in mask(normalize_url(url))
    assert scrub(f"FATAL: password {PASSWORD} rejected", url) == "FATAL: password *** rejected"
    assert scrub("nothing to hide", "sqlite:///x.db") == "nothing to hide"


def test_no_option_takes_a_secret():
    """Keys come from the environment (HITQ_JUDGE_API_KEY); a command-line argument would land in
    shell history and `ps`."""

    def params(command, path=()):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from params(sub, (*path, name))
        for p in command.params:
            yield " ".join(path), p

    words = {"key", "apikey", "token", "password", "passwd", "secret"}
    bad = [(where, p.name) for where, p in params(cli) if words & set((p.name or "").lower().split("_"))]
    assert not bad


def test_password_and_api_key_never_leak(secret_url, tmp_path, env):
    env = dict(env, HITQ_JUDGE_API_KEY=API_KEY, HITQ_DB=secret_url)
    data = write_many(tmp_path / "data", 12)
    outputs = []

    def run(*args, check=True):
        out = hitq(*args, env=env, check=check)
        outputs.append(out.stdout + out.stderr)
        return out

    run("enqueue", "--data", data, "--modality", "text", "--format", "csv", "--engine", "fake", "--engine-opt", "error=3",
        "--run", "r", "--db", secret_url)
    run("work", "--gpu", "cpu", "--procs", "2", "--drain", "--poll-seconds", "0.1")  # the URL from HITQ_DB
    run("status")
    run("status", "--json")
    run("requeue-errors", "--run", "r", "--kind", "nothing")
    run("export", "--run", "r", "--out", tmp_path / "out")
    run("db", "current")
    run("db", "upgrade")
    run("doctor", "--data", data, "--out", tmp_path / "out")
    run("eval", "--run", "r", "--data", data, check=False)
    # Errors: an unreachable server, and a database that does not exist (the server's message).
    bad = secret_url.rsplit("/", 1)[0].replace("127.0.0.1:5432", "127.0.0.1:1") + "/nope"
    assert run("status", "--db", bad, check=False).returncode == 1
    assert run("status", "--db", secret_url.rsplit("/", 1)[0] + "/hitq_does_not_exist", check=False).returncode == 1
    assert "***" in outputs[-1]

    text = "\n".join(outputs)
    assert PASSWORD not in text and API_KEY not in text
    for f in (tmp_path / "out").iterdir():
        content = f.read_text()
        assert PASSWORD not in content and API_KEY not in content, f.name
    # Nothing stored: run config, events, workers, job errors.
    engine = sa.create_engine(normalize_url(secret_url))
    with engine.connect() as conn:
        for table in ("runs", "jobs", "events", "workers"):
            dump = json.dumps([list(r) for r in conn.exec_driver_sql(f"SELECT * FROM {table}")], default=str)
            assert PASSWORD not in dump and API_KEY not in dump, table
    engine.dispose()


def test_worker_processes_do_not_carry_the_url_in_their_command_line(secret_url, tmp_path, env):
    from tests.acceptance.conftest import start, wait_for

    env = dict(env, HITQ_DB=secret_url)
    hitq("enqueue", "--data", write_many(tmp_path / "data", 4), "--modality", "text", "--format", "csv", "--engine", "fake",
         "--engine-opt", "delay_s=2", "--run", "r", env=env)
    proc = start("work", "--gpu", "cpu", "--procs", "2", "--drain", "--poll-seconds", "0.1", env=env)
    try:
        pids = wait_for(lambda: worker_pids(proc.pid), timeout=30)
        for pid in pids:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert PASSWORD.encode() not in f.read()
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def test_sqlite_database_stores_no_secret_from_the_environment(tmp_path, env):
    db = tmp_path / "h.db"
    env = dict(env, HITQ_JUDGE_API_KEY=API_KEY)
    hitq("enqueue", "--data", write_many(tmp_path / "data", 3), "--modality", "text", "--format", "csv", "--engine", "fake",
         "--run", "r", "--db", db, env=env)
    hitq("work", "--gpu", "cpu", "--drain", "--poll-seconds", "0.1", "--db", db, env=env)
    assert API_KEY.encode() not in db.read_bytes()
    conn = sqlite3.connect(db)
    assert API_KEY not in json.dumps(conn.execute("SELECT config FROM runs").fetchall())
