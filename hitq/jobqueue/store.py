"""Every SQL statement hitq runs, as methods of `Queue`, named by operation.

The claim protocol (design.md §4): a claim takes pending jobs in (priority, prefix_key, id) order
(the priority groups first), sets a lease and bumps the job's `fence`;
finish/fail/release only apply while the caller's fence is still the job's fence, so a worker that
lost its lease can never overwrite a newer result. The only dialect branch is how the claimer
locks: PostgreSQL `FOR UPDATE SKIP LOCKED`, SQLite the write lock taken by `BEGIN IMMEDIATE` (see
database.py).
"""
from __future__ import annotations

import functools
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import sqlalchemy as sa

from hitq.errors import NotFound, RunConfigConflict
from hitq.jobqueue.database import NO_RETRY, READ_ONLY, RetryPolicy
from hitq.jobqueue.models import events, jobs, runs, workers

# What makes a job the same query: re-enqueueing an id with other values is refused, not ignored.
IDENTITY_FIELDS = ("file_name", "question_type", "sub_q_type", "question", "reference")
CHUNK = 500  # rows per INSERT/UPDATE statement in bulk operations
CLAIM_LOCK = 0x6869_7471  # PostgreSQL advisory lock ("hitq") that claims take one at a time
RESULT_FIELDS = (
    "prediction", "raw_output", "original_tokens", "input_tokens", "output_tokens", "truncated",
    "rows_dropped", "image_pixels_before", "image_pixels_after", "processing_time", "details",
)


def retried(method):
    """Run a Queue method under the queue's retry policy (transient database errors only).

    Every retried method is one transaction, so a retry repeats all of it or none; the fence makes
    a repeated finish/fail safe (see `_settle`)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return self.retry.call(lambda: method(self, *args, **kwargs), what=method.__name__)

    return wrapper


@dataclass(frozen=True)
class Run:
    id: int
    name: str
    config: dict
    config_hash: str
    created_at: float


@dataclass(frozen=True)
class Job:
    """A claimed job: what a worker needs to run it, and the fence that proves it still owns it."""

    id: int
    run_id: int
    query_id: int
    file_name: str
    question_type: str
    sub_q_type: str
    question: str
    reference: str
    prefix_key: str
    attempts: int
    fence: int


class Queue:
    """The job queue over one SQLAlchemy engine (SQLite or PostgreSQL)."""

    def __init__(self, engine: sa.Engine, retry: RetryPolicy = NO_RETRY):
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"
        self.retry = retry  # workers wait out a lost database; CLI commands fail at once

    def _reading(self) -> sa.Connection:
        """A connection for reads only: on SQLite its transaction begins deferred, so status,
        exports and watchers never queue behind claimers for the write lock."""
        return self.engine.connect().execution_options(**{READ_ONLY: True})

    # -- clock ---------------------------------------------------------------------------------
    def _now(self, conn: sa.Connection) -> float:
        """Lease time: the database clock on PostgreSQL (hosts may be skewed), else the local one."""
        if self.is_postgres:
            return float(conn.execute(sa.text("SELECT extract(epoch FROM clock_timestamp())")).scalar_one())
        return time.time()

    def _log(self, conn, now: float, kind: str, rows: Iterable[tuple[int, int | None]], worker: str | None = None, detail=None):
        values = [
            {"job_id": job_id, "kind": kind, "worker": worker, "fence": fence, "at": now,
             "detail": detail if detail is None or isinstance(detail, str) else json.dumps(detail)}
            for job_id, fence in rows
        ]
        for i in range(0, len(values), CHUNK):
            conn.execute(sa.insert(events), values[i : i + CHUNK])

    # -- runs ----------------------------------------------------------------------------------
    @retried
    def get_run(self, name: str) -> Run:
        with self._reading() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.name == name)).mappings().first()
        if row is None:
            raise NotFound(f"no run named {name!r}: see `hitq status` for the runs in this database")
        return Run(**row)

    @retried
    def list_runs(self) -> list[Run]:
        with self._reading() as conn:
            return [Run(**r) for r in conn.execute(sa.select(runs).order_by(runs.c.id)).mappings()]

    def enqueue(self, name: str, config: dict, config_hash: str, rows: list[dict], event: str = "enqueued") -> tuple[int, int]:
        """Create run `name` (or check its config is unchanged) and insert the rows whose query_id is
        new. Each row holds the job's query fields, `prefix_key`, `status` and optional results.
        Returns (added, already present)."""
        with self.engine.begin() as conn:
            now = self._now(conn)
            existing = conn.execute(sa.select(runs).where(runs.c.name == name)).mappings().first()
            if existing is None:
                run_id = conn.execute(
                    sa.insert(runs).values(name=name, config=config, config_hash=config_hash, created_at=now).returning(runs.c.id)
                ).scalar_one()
            elif existing["config_hash"] != config_hash:
                old = existing["config"]
                diff = [f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(old) | set(config)) if old.get(k) != config.get(k)]
                raise RunConfigConflict(
                    f"run {name!r} exists with other settings ({'; '.join(diff) or 'config hash differs'}): "
                    "use another --run name"
                )
            else:
                run_id = existing["id"]
            same = [c for c in IDENTITY_FIELDS if any(c in r for r in rows)]
            present = {r.query_id: r for r in conn.execute(sa.select(jobs.c.query_id, *[jobs.c[c] for c in same]).where(jobs.c.run_id == run_id))}
            clash = sorted(r["query_id"] for r in rows if r["query_id"] in present
                           and any(r.get(c) != getattr(present[r["query_id"]], c) for c in same if c in r))
            if clash:
                shown = ", ".join(map(str, clash[:10])) + (f" and {len(clash) - 10} more" if len(clash) > 10 else "")
                raise RunConfigConflict(
                    f"run {name!r} already holds query id(s) {shown} with another question, table or answer: "
                    "the QA file changed since the first enqueue (or two QA files reuse ids); use another --run name"
                )
            keys = set().union(*rows) if rows else set()
            new = [dict({k: r.get(k) for k in keys}, run_id=run_id, created_at=now) for r in rows if r["query_id"] not in present]
            for i in range(0, len(new), CHUNK):
                ids = conn.execute(sa.insert(jobs).returning(jobs.c.id, sort_by_parameter_order=True), new[i : i + CHUNK]).scalars().all()
                self._log(conn, now, event, [(job_id, 0) for job_id in ids])
        return len(new), len(rows) - len(new)

    # -- the claim protocol --------------------------------------------------------------------
    def reap(self, conn: sa.Connection | None = None, now: float | None = None) -> int:
        """Expired leases: back to pending, or `error/crashed` once attempts reach max_attempts."""
        if conn is None:
            with self.engine.begin() as conn:
                return self.reap(conn, self._now(conn))
        q = sa.select(jobs.c.id, jobs.c.fence, jobs.c.lease_owner, jobs.c.attempts, jobs.c.max_attempts).where(
            jobs.c.status == "running", jobs.c.lease_expires_at < now
        )
        if self.is_postgres:
            q = q.with_for_update(skip_locked=True)
        expired = conn.execute(q).all()
        if not expired:
            return 0
        poisoned = [r for r in expired if r.attempts >= r.max_attempts]
        retry = [r for r in expired if r.attempts < r.max_attempts]
        if retry:
            conn.execute(
                sa.update(jobs).where(jobs.c.id.in_([r.id for r in retry]))
                .values(status="pending", lease_owner=None, lease_expires_at=None)
            )
        for r in poisoned:
            conn.execute(
                sa.update(jobs).where(jobs.c.id == r.id).values(
                    status="error", lease_owner=None, lease_expires_at=None, error_kind="crashed", finished_at=now,
                    error_message=f"the worker died or lost its lease on each of {r.attempts} attempts (max_attempts {r.max_attempts})",
                )
            )
        for r in expired:
            self._log(conn, now, "expired", [(r.id, r.fence)], r.lease_owner, "crashed" if r in poisoned else "retry")
        return len(expired)

    @retried
    def claim(self, worker: str, limit: int, lease_s: float, run_ids: list[int] | None = None, group_rest: int = 0) -> list[Job]:
        """Take `limit` pending jobs under a lease of `lease_s`, and up to `group_rest` more that
        finish the last one's prefix group: the priority groups (chart answers) first, then the
        rest, each in prefix-group order, so a group goes to one worker and its prefix is
        prefilled once (a group split between two workers is prefilled by both). The worker that
        holds the long answers decodes them in shared steps and paces them beside its prefills
        (fastgen.run), while the others take the rest."""
        with self.engine.begin() as conn:
            if self.is_postgres:
                # One claim at a time (SQLite's write lock does the same): under SKIP LOCKED alone, a
                # claim running beside another takes the rest of the group the other is finishing.
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(CLAIM_LOCK)))
            now = self._now(conn)
            self.reap(conn, now)
            pending = [jobs.c.status == "pending"] + ([jobs.c.run_id.in_(run_ids)] if run_ids is not None else [])
            picked, key = [], (jobs.c.id, jobs.c.run_id, jobs.c.priority, jobs.c.prefix_key)
            # the priority part is small; the rest is read from ix_jobs_claim in claim order, with no sort
            for which in (jobs.c.priority > 0, jobs.c.priority == 0):
                if len(picked) < limit:
                    picked += self._pick(conn, sa.select(*key).where(
                        *pending, which, jobs.c.id.not_in([r.id for r in picked])).order_by(jobs.c.prefix_key, jobs.c.id)
                        .limit(limit - len(picked)))
            if group_rest and picked and picked[-1].prefix_key is not None:
                last = picked[-1]
                picked += self._pick(conn, sa.select(*key).where(  # ix_jobs_claim's columns, in its order
                    jobs.c.run_id == last.run_id, jobs.c.status == "pending", jobs.c.priority == last.priority,
                    jobs.c.prefix_key == last.prefix_key,
                    jobs.c.id.not_in([r.id for r in picked])).order_by(jobs.c.id).limit(group_rest))
            ids = [r.id for r in picked]
            claimed = conn.execute(
                sa.update(jobs)
                .where(jobs.c.id.in_(ids))
                .values(
                    status="running", lease_owner=worker, lease_expires_at=now + lease_s, fence=jobs.c.fence + 1,
                    attempts=jobs.c.attempts + 1, started_at=now, queue_time=now - jobs.c.created_at,
                )
                .returning(*[jobs.c[f] for f in Job.__dataclass_fields__])
            ).mappings().all()
            self._log(conn, now, "claimed", [(r["id"], r["fence"]) for r in claimed], worker)
        order = {job_id: i for i, job_id in enumerate(ids)}  # priority groups first
        return sorted((Job(**r) for r in claimed), key=lambda j: order[j.id])

    def _pick(self, conn, select) -> list:
        """Rows of `select`, locked against other claims on PostgreSQL (rows others hold are skipped)."""
        return conn.execute(select.with_for_update(skip_locked=True) if self.is_postgres else select).all()

    def heartbeat(self, worker: str, held: dict[int, int], lease_s: float) -> set[int]:
        """Extend the leases of `held` ({job id: fence}); returns the ids this worker still owns."""
        with self.engine.begin() as conn:
            now = self._now(conn)
            conn.execute(sa.update(workers).where(workers.c.id == worker).values(heartbeat_at=now))
            if not held:
                return set()
            kept = conn.execute(
                sa.update(jobs)
                .where(jobs.c.id.in_(list(held)), jobs.c.lease_owner == worker, jobs.c.status == "running")
                .values(lease_expires_at=now + lease_s)
                .returning(jobs.c.id, jobs.c.fence)
            ).all()
            owned = {r.id for r in kept if held.get(r.id) == r.fence}
            # Lost: claimed again since (newer fence) or reaped back to pending. A job this worker
            # settled a moment ago (done/error, same fence) is neither owned nor lost.
            current = conn.execute(sa.select(jobs.c.id, jobs.c.fence, jobs.c.status).where(jobs.c.id.in_(list(held)))).all()
            lost = [(r.id, held[r.id]) for r in current if r.id not in owned and (r.fence != held[r.id] or r.status in ("pending", "running"))]
            self._log(conn, now, "heartbeat-lost", lost, worker)
        return owned | {r.id for r in current if r.id not in owned and (r.id, held[r.id]) not in lost}

    def _settle(self, job_id: int, fence: int, worker: str, status: str, kind: str, values: dict, detail=None) -> bool:
        with self.engine.begin() as conn:
            now = self._now(conn)
            done = conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id, jobs.c.fence == fence, jobs.c.status == "running")
                .values(status=status, lease_owner=None, lease_expires_at=None, finished_at=now, **values)
            ).rowcount
            if not done and conn.execute(
                sa.select(sa.func.count()).select_from(jobs).where(jobs.c.id == job_id, jobs.c.fence == fence, jobs.c.status == status)
            ).scalar_one():
                # Already settled under this very fence: a retry of our own write whose commit
                # succeeded before the connection dropped. Not a loss, not a second result.
                return True
            self._log(conn, now, kind if done else "rejected", [(job_id, fence)], worker, detail if done else f"late {kind}")
            if done:
                conn.execute(sa.update(workers).where(workers.c.id == worker).values(jobs_done=workers.c.jobs_done + 1, heartbeat_at=now))
        return bool(done)

    @retried
    def finish(self, job: Job, worker: str, result: dict) -> bool:
        """Record a prediction. False (and a `rejected` event) if a newer claim owns the job."""
        values = {k: result[k] for k in RESULT_FIELDS if k in result}
        return self._settle(job.id, job.fence, worker, "done", "finished", dict(values, error_kind=None, error_message=None))

    @retried
    def fail(self, job: Job, worker: str, kind: str, message: str, result: dict | None = None) -> bool:
        """Record a classified error. False (and a `rejected` event) if a newer claim owns the job."""
        values = {k: v for k, v in (result or {}).items() if k in RESULT_FIELDS}
        return self._settle(job.id, job.fence, worker, "error", "failed", dict(values, error_kind=kind, error_message=message), kind)

    @retried
    def release(self, held: list[Job], worker: str) -> int:
        """Give claimed-but-unstarted jobs back without counting an attempt."""
        if not held:
            return 0
        with self.engine.begin() as conn:
            now = self._now(conn)
            released = []
            for job in held:
                n = conn.execute(
                    sa.update(jobs)
                    .where(jobs.c.id == job.id, jobs.c.fence == job.fence, jobs.c.status == "running")
                    .values(status="pending", attempts=jobs.c.attempts - 1, lease_owner=None, lease_expires_at=None)
                ).rowcount
                if n:
                    released.append((job.id, job.fence))
            self._log(conn, now, "released", released, worker)
        return len(released)

    def requeue(self, run_id: int | None, kinds: list[str] | None = None, query_ids: set[int] | None = None) -> int:
        """error → pending for the matching jobs (attempts kept); one `requeued` event each."""
        with self.engine.begin() as conn:
            now = self._now(conn)
            pick = sa.select(jobs.c.id, jobs.c.fence).where(jobs.c.status == "error")
            if run_id is not None:
                pick = pick.where(jobs.c.run_id == run_id)
            if kinds:
                pick = pick.where(jobs.c.error_kind.in_(kinds))
            if query_ids:
                pick = pick.where(jobs.c.query_id.in_(sorted(query_ids)))
            rows = conn.execute(pick).all()
            ids = [r.id for r in rows]
            for i in range(0, len(ids), CHUNK):
                conn.execute(
                    sa.update(jobs).where(jobs.c.id.in_(ids[i : i + CHUNK]))
                    .values(status="pending", error_kind=None, error_message=None, finished_at=None, created_at=now)
                )
            self._log(conn, now, "requeued", [(r.id, r.fence) for r in rows])
        return len(rows)

    # -- workers -------------------------------------------------------------------------------
    @retried
    def register_worker(self, worker: str, host: str, pid: int, device: str) -> None:
        with self.engine.begin() as conn:
            now = self._now(conn)
            conn.execute(sa.delete(workers).where(workers.c.id == worker))
            conn.execute(sa.insert(workers).values(id=worker, host=host, pid=pid, device=device, started_at=now, heartbeat_at=now, state="running"))

    @retried
    def set_worker_state(self, worker: str, state: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.update(workers).where(workers.c.id == worker).values(state=state, heartbeat_at=self._now(conn)))

    def list_workers(self) -> list[dict]:
        with self._reading() as conn:
            now = self._now(conn)
            return [dict(r, age_s=now - r["heartbeat_at"]) for r in conn.execute(sa.select(workers).order_by(workers.c.started_at)).mappings()]

    # -- reading -------------------------------------------------------------------------------
    def unclaimed(self, run_ids: list[int] | None) -> int:
        """Pending jobs: what the next claims can take (a stream's lots shrink near the end)."""
        return self._count(run_ids, ["pending"])

    @retried
    def held_by_others(self, worker: str, run_ids: list[int] | None) -> int:
        """Jobs running under another worker's live lease: whether this worker shares its runs
        (a stream paces its long answers only then)."""
        q = sa.select(sa.func.count()).select_from(jobs).where(jobs.c.status == "running", jobs.c.lease_owner != worker)
        if run_ids is not None:
            q = q.where(jobs.c.run_id.in_(run_ids))
        with self._reading() as conn:
            return conn.execute(q.where(jobs.c.lease_expires_at >= self._now(conn))).scalar_one()

    def unfinished(self, run_ids: list[int] | None) -> int:
        """Jobs that are pending or running: a draining worker stops when this reaches zero."""
        return self._count(run_ids, ["pending", "running"])

    @retried
    def _count(self, run_ids: list[int] | None, statuses: list[str]) -> int:
        q = sa.select(sa.func.count()).select_from(jobs).where(jobs.c.status.in_(statuses))
        if run_ids is not None:
            q = q.where(jobs.c.run_id.in_(run_ids))
        with self._reading() as conn:
            return conn.execute(q).scalar_one()

    @retried
    def runs_with_pending(self) -> list[int]:
        """Runs with claimable work: pending jobs, or running ones whose lease expired (a dead
        worker's), which the next claim reaps. Without the latter a queue whose last job lost
        its worker would wait forever."""
        with self._reading() as conn:
            now = self._now(conn)
            q = sa.select(jobs.c.run_id).where(
                sa.or_(jobs.c.status == "pending", sa.and_(jobs.c.status == "running", jobs.c.lease_expires_at < now))
            ).group_by(jobs.c.run_id).order_by(jobs.c.run_id)
            return list(conn.execute(q).scalars())

    def stats(self, run: Run, window_s: float = 600.0) -> dict:
        """Counts per status and error kind, and the recent rate of finished jobs."""
        with self._reading() as conn:
            now = self._now(conn)
            by_status = dict(conn.execute(sa.select(jobs.c.status, sa.func.count()).where(jobs.c.run_id == run.id).group_by(jobs.c.status)).all())
            errors = dict(conn.execute(
                sa.select(jobs.c.error_kind, sa.func.count()).where(jobs.c.run_id == run.id, jobs.c.status == "error").group_by(jobs.c.error_kind)
            ).all())
            recent = conn.execute(
                sa.select(sa.func.count(), sa.func.min(jobs.c.finished_at)).where(
                    jobs.c.run_id == run.id, jobs.c.status.in_(["done", "error"]), jobs.c.finished_at >= now - window_s,
                    jobs.c.started_at.is_not(None),
                )
            ).one()
            mean_time = conn.execute(
                sa.select(sa.func.avg(jobs.c.processing_time)).where(jobs.c.run_id == run.id, jobs.c.status == "done")
            ).scalar()
        counts = {s: int(by_status.get(s, 0)) for s in ("pending", "running", "done", "error")}
        rate = recent[0] / max(now - recent[1], 1.0) if recent[0] else 0.0
        left = counts["pending"] + counts["running"]
        return {
            "name": run.name, "counts": counts, "total": sum(counts.values()), "errors": {str(k): int(v) for k, v in errors.items()},
            "jobs_per_s": round(rate, 4), "mean_processing_s": round(float(mean_time), 3) if mean_time else None,
            "eta_s": round(left / rate) if rate and left else (0 if not left else None),
        }

    def result_rows(self, name: str) -> list[dict]:
        """Every job of run `name` in query id order, as plain dicts (export, eval, report)."""
        run = self.get_run(name)
        with self._reading() as conn:
            rows = conn.execute(sa.select(jobs).where(jobs.c.run_id == run.id).order_by(jobs.c.query_id)).mappings().all()
        return [dict(r) for r in rows]

    def event_log(self, run_id: int | None = None) -> list[dict]:
        q = sa.select(events, jobs.c.query_id).join(jobs, jobs.c.id == events.c.job_id).order_by(events.c.id)
        if run_id is not None:
            q = q.where(jobs.c.run_id == run_id)
        with self._reading() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def event_counts(self, run_id: int) -> Counter:
        q = sa.select(events.c.kind, sa.func.count()).join(jobs, jobs.c.id == events.c.job_id).where(jobs.c.run_id == run_id).group_by(events.c.kind)
        with self._reading() as conn:
            return Counter(dict(conn.execute(q).all()))

    def save_scores(self, name: str, scores: dict[int, dict]) -> int:
        """Store per-job scores ({query id: {metric: value}}) for run `name`."""
        run = self.get_run(name)
        with self.engine.begin() as conn:
            n = 0
            for query_id, value in scores.items():
                n += conn.execute(
                    sa.update(jobs).where(jobs.c.run_id == run.id, jobs.c.query_id == int(query_id)).values(scores=value)
                ).rowcount
        return n
