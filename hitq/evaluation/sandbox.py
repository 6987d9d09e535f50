"""Run chart jobs in a sandboxed child process (``chart_runner.py``) and collect their results.

What the sandbox guarantees (tested in tests/unit/test_chart_sandbox.py):

* the child runs in a new session (its own process group) with a scrubbed environment
  (``MPLBACKEND=Agg``, no proxies, HOME inside the temporary directory), cwd in the temporary
  directory, stdin/stdout closed to the evaluator, under RLIMIT_AS / RLIMIT_CPU / RLIMIT_FSIZE /
  RLIMIT_CORE set in ``preexec_fn``;
* an audit hook, installed before any model code runs, refuses: ``open()`` for writing and
  remove/rename/mkdir/chmod/link/... outside the temporary directory, every ``socket.*`` event,
  ``subprocess``/``os.system``/``os.exec*``/``os.fork``/``posix_spawn``, ``os.kill``, ``ctypes``
  loading, ``resource.setrlimit``; RLIMIT_NPROC is dropped to 0 as a second fence for non-root users;
* a row that does not finish within its time is killed (per row in corrected mode; in official mode
  the whole group is killed and a fresh child continues with the remaining rows), and the whole
  process group is killed when the evaluator is done or interrupted.

Not guaranteed: reading files is allowed (tables, libraries, anything world-readable); C extensions
already loaded before the hook (numpy, pandas, matplotlib) can do I/O that raises no audit event;
``os.write`` on an inherited descriptor raises no event; model code shares the interpreter with the
runner and could forge its own result. It is a guard against accidents and sloppy code, not against
a determined attacker: run untrusted evaluations in a container as a non-root user as well.
"""
from __future__ import annotations

import json
import os
import resource
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

RUNNER = Path(__file__).with_name("chart_runner.py")

#: address-space limit of the chart child (bytes); pandas + matplotlib need well under 1 GiB.
MEMORY_LIMIT_BYTES = 3 * 1024**3
#: largest file the child may write (bytes).
FILE_SIZE_LIMIT_BYTES = 64 * 1024**2
#: seconds a fresh child may take to import pandas/matplotlib before its first row.
STARTUP_TIMEOUT_S = 120.0


def _limits(cpu_seconds: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _env(root: Path) -> dict[str, str]:
    """A minimal environment: no credentials, no proxies, a persistent matplotlib font cache."""
    mpl = Path(os.environ.get("HITQ_MPLCONFIGDIR", Path.home() / ".cache" / "hitq" / "matplotlib"))
    mpl.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(root),
        "LANG": "C.UTF-8",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": str(mpl),
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
    }


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _spawn(mode: str, jobs: list[dict], root: Path, row_timeout_s: float, attempt: int):
    jobs_path = root / f"jobs-{attempt}.json"
    jobs_path.write_text(json.dumps(jobs), encoding="utf-8")
    r, w = os.pipe()
    cpu = int(row_timeout_s * 2 * len(jobs) + 60)
    stderr = open(root / f"runner-{attempt}.stderr", "wb")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", str(RUNNER), mode, str(jobs_path), str(w), str(root), str(row_timeout_s)],
            cwd=root, env=_env(root), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            pass_fds=(w,), start_new_session=True, preexec_fn=_limits(cpu),
        )
    finally:
        os.close(w)
        stderr.close()
    return proc, r


def run_jobs(mode: str, jobs: list[dict], root: Path, row_timeout_s: float) -> dict[int, dict]:
    """Run ``jobs`` in as few children as possible; returns ``{id: result}`` for every job.

    The hard per-row deadline is ``2 * row_timeout_s + 2`` (two stages in official mode); a row that
    passes it gets ``{"ecr": False, "error": "timeout", "timeout": True}`` and the remaining rows go
    to a new child. A child that dies mid-row marks that row as crashed and is replaced the same way.
    """
    results: dict[int, dict] = {}
    pending = list(jobs)
    hard_limit = 2 * row_timeout_s + 2
    attempt = 0
    while pending:
        attempt += 1
        proc, fd = _spawn(mode, pending, root, row_timeout_s, attempt)
        current, started, buffer = None, time.monotonic(), b""
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        try:
            while True:
                limit = hard_limit if current is not None else STARTUP_TIMEOUT_S
                left = started + limit - time.monotonic()
                if left <= 0:
                    _kill_group(proc)
                    break
                if not sel.select(timeout=left):
                    continue
                data = os.read(fd, 65536)
                if not data:
                    break
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    if msg["event"] == "start":
                        current, started = msg["id"], time.monotonic()
                    else:
                        results[msg["id"]] = msg
                        current, started = None, time.monotonic()
        finally:
            sel.close()
            os.close(fd)
            if proc.poll() is None:
                _kill_group(proc)
        if current is not None:
            timed_out = time.monotonic() - started >= hard_limit
            results[current] = {"id": current, "ecr": False, "output": "", "values": None, "timeout": timed_out,
                                "error": "timeout" if timed_out else f"runner died (exit {proc.returncode})"}
        elif not any(j["id"] in results for j in pending):  # the child never got going
            tail = (root / f"runner-{attempt}.stderr").read_text(errors="replace")[-800:]
            for job in pending:
                results[job["id"]] = {"id": job["id"], "ecr": False, "output": "", "values": None,
                                      "error": f"sandbox failed to start: {tail.strip()}"}
        pending = [j for j in pending if j["id"] not in results]
    return results
