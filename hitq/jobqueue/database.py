"""Database URLs, engines and migrations: the only module that knows about drivers and files."""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from hitq.errors import DatabaseError

DEFAULT_URL = "sqlite:///hitq.db"
READ_ONLY = "hitq_read_only"  # execution option marking a connection that only reads
SQLITE_BUSY_TIMEOUT_MS = 30_000  # how long a writer waits for the SQLite write lock (env HITQ_SQLITE_BUSY_TIMEOUT_MS)
# Filesystems on which SQLite's locking is unreliable (several processes, several hosts).
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb", "smbfs", "smb3", "sshfs", "fuse.sshfs", "9p", "afs", "lustre", "gpfs", "beegfs", "glusterfs", "fuse.glusterfs", "ceph", "fuse.ceph"}


def normalize_url(url: str | None) -> str:
    """`sqlite:///x.db`, `postgresql://…` or a bare file path → a SQLAlchemy URL with our drivers."""
    url = (url or DEFAULT_URL).strip()
    if "://" not in url:
        return "sqlite:///" + str(Path(url).expanduser().resolve())
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith(("sqlite://", "postgresql+")):
        return url
    raise DatabaseError(f"unsupported database URL {mask(url)}: use sqlite:///FILE, a file path or postgresql://…")


def mask(url: str) -> str:
    """The URL with its password replaced by ***, safe to print or store."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def scrub(text: str, url: str | None) -> str:
    """`text` with the password of `url` (if any) replaced by ***: for driver messages that might echo it."""
    try:
        password = make_url(normalize_url(url)).password if url else None
    except Exception:
        password = None
    return text.replace(str(password), "***") if password else text


def sqlite_busy_timeout_ms() -> int:
    """How long a SQLite writer waits for the write lock before `database is locked`."""
    try:
        return int(os.environ.get("HITQ_SQLITE_BUSY_TIMEOUT_MS", SQLITE_BUSY_TIMEOUT_MS))
    except ValueError:
        return SQLITE_BUSY_TIMEOUT_MS


# -- the retry policy: the one place that decides which database errors are worth waiting out --
T = TypeVar("T")
log = logging.getLogger("hitq.database")


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached right now (down, restarting, or locked): try again later."""


class _PoolOneLine(logging.Filter):
    """SQLAlchemy's pool logs a full traceback when it cannot reset a connection that the server
    already dropped (e.g. terminated in the middle of a pipelined insert). The connection is
    discarded and the caller's retry line tells the story, so the pool's record becomes one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("sqlalchemy.pool") and record.exc_info and record.exc_info[1] is not None:
            reason = (str(record.exc_info[1]).strip().splitlines() or [""])[0]
            record.msg, record.args = f"{record.getMessage()}: {reason}", None
            record.exc_info = record.exc_text = None
        return True


def one_line_pool_errors() -> None:
    """Install _PoolOneLine on the root logger's handlers (worker and supervisor processes, after
    logging.basicConfig): the pool logs through per-pool child loggers, which handler filters see."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _PoolOneLine) for f in handler.filters):
            handler.addFilter(_PoolOneLine())


# SQLite reports "no such table" and syntax errors as OperationalError too: only these are transient.
SQLITE_TRANSIENT = ("locked", "busy", "unable to open", "disk i/o error")


def is_transient(error: BaseException) -> bool:
    """True for errors that a later attempt may not meet: the server restarted or dropped the
    connection, the network blinked, the SQLite file stayed locked past the busy timeout."""
    if isinstance(error, DatabaseUnavailable):
        return True
    if isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        orig = getattr(error, "orig", None)
        if type(orig).__module__.startswith("sqlite3"):
            return any(word in str(orig).lower() for word in SQLITE_TRANSIENT)
        return True
    if isinstance(error, (sa.exc.DisconnectionError, sa.exc.TimeoutError)):  # TimeoutError: pool exhausted
        return True
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for transient database errors.

    `give_up_s` None: never give up (a worker keeps its result in memory until the database is back).
    The default policy (`NO_RETRY`) fails at once: CLI commands report a clear error instead of waiting."""

    give_up_s: float | None = 0.0  # total seconds to keep trying; 0: do not retry
    first_wait_s: float = 0.1  # wait after the first failure, doubled after each
    max_wait_s: float = 10.0  # cap on one wait

    def call(self, fn: Callable[[], T], what: str = "database call") -> T:
        """`fn()`, retried while it raises a transient database error and time is left."""
        start, wait, failures = time.monotonic(), self.first_wait_s, 0
        while True:
            try:
                result = fn()
            except Exception as e:
                if not is_transient(e):
                    raise
                elapsed = time.monotonic() - start
                if self.give_up_s is not None and elapsed + wait > self.give_up_s:
                    raise
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    log.warning("%s failed (%s), retrying for %s", what, _first_line(e),
                                "ever" if self.give_up_s is None else f"up to {self.give_up_s:.0f}s",
                                extra={"action": "db_retry", "failures": failures})
                time.sleep(wait * (0.5 + random.random()))
                wait = min(wait * 2, self.max_wait_s)
                continue
            if failures:
                log.info("%s succeeded after %d failures (%.1fs)", what, failures, time.monotonic() - start,
                         extra={"action": "db_reconnected", "failures": failures})
            return result


NO_RETRY = RetryPolicy(give_up_s=0.0)
# Workers: wait out restarts, failovers and long locks for up to an hour, then let the supervisor restart them.
WORKER_RETRY = RetryPolicy(give_up_s=float(os.environ.get("HITQ_DB_RETRY_S", 3600)), first_wait_s=0.1, max_wait_s=5.0)


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def filesystem_type(path: Path, mounts: str = "/proc/mounts") -> str | None:
    """The type of the filesystem holding `path`, from the longest matching mount point."""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    path = path.resolve()
    best, best_type = "", None
    for line in lines:
        parts = line.split()
        if len(parts) >= 3:
            point = parts[1].replace("\\040", " ")
            if (str(path) == point or str(path).startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best, best_type = point, parts[2]
    return best_type


def create(url: str | None, mounts: str | None = None) -> sa.Engine:
    """An engine for `url`, checked to be reachable. SQLite: WAL, busy timeout, BEGIN IMMEDIATE."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        return _sqlite_engine(url, mounts or os.environ.get("HITQ_PROC_MOUNTS", "/proc/mounts"))
    try:
        engine = sa.create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2)
        with engine.connect():
            pass
    except ModuleNotFoundError:
        raise DatabaseError("PostgreSQL support not installed: pip install 'hitq[postgres]'") from None
    except sa.exc.SQLAlchemyError as e:
        raise DatabaseUnavailable(f"cannot connect to {mask(url)}: {scrub(_first_line(e), url)}") from None
    return engine


def _sqlite_engine(url: str, mounts: str) -> sa.Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        path = Path(database)
        if not path.parent.is_dir():
            raise DatabaseError(f"cannot create SQLite database {path}: directory {path.parent} does not exist")
        fs = filesystem_type(path.parent, mounts)
        if fs in NETWORK_FILESYSTEMS:
            raise DatabaseError(
                f"SQLite database {path} is on a network filesystem ({fs}); its locks are unreliable there: "
                "use a local disk or PostgreSQL (--db postgresql://…)"
            )
    busy_ms = sqlite_busy_timeout_ms()
    engine = sa.create_engine(url, connect_args={"timeout": busy_ms / 1000})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn):
        # Writers take the write lock up front: claimers serialise instead of failing on lock
        # upgrade. Reads (Queue.reading) begin deferred: in WAL mode they never wait for a writer.
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as e:
        error = DatabaseUnavailable if is_transient(e) else DatabaseError
        raise error(f"cannot open SQLite database {database}: {e.orig}") from None
    return engine


def _alembic_config(connection):
    import logging

    from alembic.config import Config

    logging.getLogger("alembic").setLevel(logging.WARNING)

    cfg = Config()
    cfg.set_main_option("script_location", "hitq:migrations")
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()


def current_revision(engine: sa.Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect().execution_options(**{READ_ONLY: True}) as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    from alembic import command

    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7431001)")  # one migrator at a time
        command.upgrade(_alembic_config(conn), revision)


def downgrade(engine: sa.Engine, revision: str) -> None:
    from alembic import command

    with engine.begin() as conn:
        command.downgrade(_alembic_config(conn), revision)


def ensure_migrated(engine: sa.Engine, migrate: bool = True) -> None:
    """Upgrade a new or old database to head (or refuse, when `migrate` is False)."""
    if current_revision(engine) == head_revision():
        return
    if not migrate:
        raise DatabaseError("database is not migrated: run `hitq db upgrade`")
    upgrade(engine)


def url_from_env(url: str | None) -> str:
    return url or os.environ.get("HITQ_DB") or DEFAULT_URL
