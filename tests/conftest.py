"""Fixtures shared by every test: isolated HITQ_* settings, and a database per test on SQLite and
PostgreSQL (HITQ_TEST_POSTGRES_URL, default the local server; skipped only when that default
is unreachable and the variable is unset)."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HITQ_DB", str(tmp_path / "default-hitq.db"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("HITQ_FAKE_FAULTS", raising=False)


def _pg_admin_url() -> str | None:
    url = os.environ.get("HITQ_TEST_POSTGRES_URL")
    explicit = url is not None
    url = url or DEFAULT_PG
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
        with engine.connect():
            pass
        engine.dispose()
        return url
    except Exception:
        if explicit:
            raise
        return None


@pytest.fixture(scope="session")
def pg_admin_url():
    return _pg_admin_url()


def _new_pg_database(admin_url: str) -> str:
    import sqlalchemy as sa

    name = f"hitq_test_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(admin_url.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine.dispose()
    return admin_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path, pg_admin_url):
    """A fresh, empty database: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hitq.db'}"
    if pg_admin_url is None:
        pytest.skip("PostgreSQL not reachable (set HITQ_TEST_POSTGRES_URL)")
    return _new_pg_database(pg_admin_url)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny Qwen3-VL that `hitq model tiny` writes, built once per test session."""
    from hitq.engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny")
