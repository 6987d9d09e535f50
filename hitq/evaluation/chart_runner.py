"""Child process that executes model-written chart code; run as a script, never imported by hitq.

    python chart_runner.py MODE JOBS_JSON RESULT_FD ROOT ROW_TIMEOUT_S

``MODE`` is ``official`` or ``corrected``. Jobs are prepared by ``hitq.evaluation.charts``; results go
back as JSON lines on the inherited pipe ``RESULT_FD`` (never on stdout, which model code owns):
``{"id": .., "event": "start"}`` before a row and ``{"id": .., "event": "done", ...}`` after it.

official   all rows run sequentially in this one process, as RealHiTBench's inference loop did: exec
           with the official module-like globals, the ``__main__`` wrapper, two stages (ECR, then the
           values printed to a captured stdout), a SIGALRM per stage (ROW_TIMEOUT_S, official 15 s), figures left open after a
           failure (the stale-figure leak), and numpy-1 scalar reprs (``legacy="1.25"``).
corrected  this process imports the libraries once, then forks one child per row: fresh globals, a
           cwd holding the table, values read from every axes and returned as JSON floats, the child
           killed after ROW_TIMEOUT_S.

Before any model code runs, ``_guard`` installs an audit hook that refuses writes outside ROOT,
file-system mutations outside ROOT, sockets, process creation, signals to other processes and
ctypes, and drops RLIMIT_NPROC to 0 (effective for non-root users only).
"""
import ast
import builtins
import io
import json
import os
import resource
import signal
import sys
import time

os.environ.setdefault("MPLBACKEND", "Agg")
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
                "os.link", "os.symlink", "os.rename", "shutil.rmtree", "shutil.move", "os.chflags",
                "os.setxattr", "os.removexattr", "os.mkfifo", "os.mknod"}
_DENIED_PREFIXES = ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
                    "os.forkpty", "os.system", "os.kill", "os.killpg", "signal.pthread_kill", "pty.",
                    "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "os.startfile", "winreg.",
                    "os.setuid", "os.setgid", "resource.setrlimit", "resource.prlimit", "sys.remote_exec")


def _guard(root):
    """Install the sandbox audit hook (irreversible for this process) and drop RLIMIT_NPROC."""
    root = os.path.realpath(root)
    busy = [False]
    realpath, fspath = os.path.realpath, os.fspath

    def inside(path):
        if isinstance(path, int):
            return True  # an already-open descriptor
        p = realpath(os.fsdecode(fspath(path)))
        return p == root or p.startswith(root + os.sep)

    def hook(event, args):
        if busy[0]:
            return
        busy[0] = True
        try:
            if event == "open":
                path, mode, flags = (tuple(args) + (None, None))[:3]
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & _WRITE_FLAGS)
                if writing and path is not None and not inside(path):
                    raise PermissionError(f"sandbox: writing outside the work directory: {path}")
            elif event in _PATH_EVENTS:
                for arg in args:
                    if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg):
                        raise PermissionError(f"sandbox: {event} outside the work directory: {arg}")
            elif event.startswith(_DENIED_PREFIXES):
                raise PermissionError(f"sandbox: {event} is not allowed")
        finally:
            busy[0] = False

    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    except (ValueError, OSError):
        pass
    sys.addaudithook(hook)


def _send(fd, obj):
    data = (json.dumps(obj, allow_nan=True) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


# --------------------------------------------------------------------------- official mode


class _Timeout(AssertionError):
    """timeout_decorator's TimeoutError subclasses AssertionError; keep that for fidelity."""


def _alarm(signum, frame):
    raise _Timeout("Timed Out")


def _official_reader_module():
    """A stand-in for ``utils.chart_metric_util``: same public names, same reader code."""
    import types

    m = types.ModuleType("utils.chart_metric_util")
    m.np, m.os, m.sys = np, os, sys
    m.base_dir = os.getcwd()
    m.get_line_y_predictions = lambda plt: [list(line.get_ydata()) for line in plt.gca().get_lines()]
    m.get_bar_y_predictions = lambda plt: [p.get_height() for p in plt.gca().patches]
    m.get_hbar_y_predictions = lambda plt: [p.get_width() for p in plt.gca().patches]
    m.get_pie_y_predictions = lambda plt: [round((p.theta2 - p.theta1) / 360.0, 2) for p in plt.gca().patches]
    m.get_scatter_y_predictions = lambda plt: [[item[1] for item in c.get_offsets()] for c in plt.gca().collections]
    pkg = types.ModuleType("utils")
    pkg.chart_metric_util = m
    sys.modules["utils"], sys.modules["utils.chart_metric_util"] = pkg, m
    return m


def _official_globals():
    """The names RealHiTBench's inference module had when it exec'd model code (defect 15)."""
    import argparse
    import base64
    import concurrent.futures
    import datetime
    import re
    import traceback

    g = {"__name__": "__main__", "__builtins__": builtins, "sys": sys, "os": os, "concurrent": concurrent,
         "datetime": datetime, "json": json, "ast": ast, "argparse": argparse, "pd": pd, "base64": base64,
         "time": time, "io": io, "re": re, "plt": plt, "traceback": traceback}
    reader = _official_reader_module()
    g.update({k: v for k, v in vars(reader).items() if not k.startswith("_")})
    return g


def _official_execute(code, g, seconds):
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        exec(code, g, {"c": code})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _official_row(job, g, timeout):
    """``exec_and_get_y_reference`` of inference_llm.py, stage by stage."""
    try:
        _official_execute(job["stage1"], g, timeout)
        plt.close("all")
    except Exception as exc:  # figures stay open: the official leak (defect 17)
        return {"ecr": False, "output": "", "error": f"{type(exc).__name__}: {exc}"[:500]}
    buffer, stdout = io.StringIO(), sys.stdout
    try:
        sys.stdout = buffer
        _official_execute(job["stage2"], g, timeout)
    except Exception as exc:
        return {"ecr": True, "output": "", "error": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        sys.stdout = stdout
    plt.close("all")
    return {"ecr": True, "output": buffer.getvalue().strip(), "error": None}


def _matplotlib_39_pie():
    """matplotlib < 3.10 converted pie sizes with ``np.asarray(x, np.float32)``; 3.10+ keeps the
    dtype, so object arrays (pandas rows of mixed columns) fail ``isfinite``. Restore the old cast."""
    from matplotlib.axes import Axes

    if tuple(int(p) for p in matplotlib.__version__.split(".")[:2]) < (3, 10):
        return
    original = Axes.pie

    def pie(self, *args, **kwargs):
        if args:
            args = (np.asarray(args[0], np.float32),) + args[1:]
        elif "x" in kwargs:
            kwargs["x"] = np.asarray(kwargs["x"], np.float32)
        return original(self, *args, **kwargs)

    pie.__wrapped__ = original
    Axes.pie = pie


def _run_official(jobs, fd, root, timeout):
    np.set_printoptions(legacy="1.25")  # numpy-1 scalar repr, as in the official environment
    _matplotlib_39_pie()
    signal.signal(signal.SIGALRM, _alarm)
    g = _official_globals()
    os.chdir(root)
    _guard(root)
    for job in jobs:
        _send(fd, {"id": job["id"], "event": "start"})
        start = time.monotonic()
        try:
            result = _official_row(job, g, timeout)
        except BaseException as exc:  # SystemExit and friends end a row, not the run
            result = {"ecr": False, "output": "", "error": f"{type(exc).__name__}: {exc}"[:500]}
        result.update(id=job["id"], event="done", seconds=round(time.monotonic() - start, 3))
        _send(fd, result)


# --------------------------------------------------------------------------- corrected mode


def _floats(seq):
    arr = np.ma.filled(np.ma.asarray(seq, dtype=float).ravel(), np.nan)
    return [float(v) for v in arr]


def _read_values(chart_type):
    """Every series of every axes of the current figure, per chart type, as lists of floats."""
    from matplotlib.container import BarContainer
    from matplotlib.patches import Rectangle, Wedge

    if not plt.get_fignums():
        raise ValueError("the code drew no figure")
    series = []
    for ax in plt.gcf().axes:
        if chart_type == "LineChart":
            series += [_floats(ln.get_ydata()) for ln in ax.get_lines() if ln.get_transform() == ax.transData]
        elif chart_type == "BarChart":
            bars = [c for c in ax.containers if isinstance(c, BarContainer)]
            for c in bars:
                horizontal = getattr(c, "orientation", "vertical") == "horizontal"
                series.append(_floats([p.get_width() if horizontal else p.get_height() for p in c.patches]))
            if not bars:
                series += [_floats([p.get_height() for p in ax.patches if isinstance(p, Rectangle)])]
        elif chart_type == "PieChart":
            wedges = [p for p in ax.patches if isinstance(p, Wedge)]
            if wedges:
                series.append([float(w.theta2 - w.theta1) / 360.0 for w in wedges])
        elif chart_type == "ScatterChart":
            series += [_floats(np.ma.asarray(c.get_offsets())[:, 1]) for c in ax.collections
                       if len(c.get_offsets())]
    return series


def _corrected_child(job, w, root, timeout):
    """Runs in the forked child: never returns."""
    status = 1
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (int(timeout) + 1, int(timeout) + 2))
        os.chdir(job["dir"])
        sys.stdout = sys.stderr = io.StringIO()
        _guard(root)
        result = {"ecr": False, "values": None, "error": None}
        try:
            exec(compile(job["source"], "<model code>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
            result["ecr"] = True
            result["values"] = _read_values(job["chart_type"])
        except BaseException as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"[:500]
        try:
            _send(w, result)
        except (TypeError, ValueError) as exc:  # values that are not JSON floats
            _send(w, {"ecr": result["ecr"], "values": None, "error": f"values not serialisable: {exc}"})
        status = 0
    finally:
        os._exit(status)


def _warm_up(jobs):
    """Import lazily-loaded machinery once, so that each forked row does not pay for it."""
    import openpyxl  # noqa: F401  (read_excel's engine)

    fig, ax = plt.subplots()
    ax.plot([1, 2], [1, 2])
    ax.bar(["a", "b"], [1, 2])
    ax.scatter([1], [1])
    ax.pie([1, 2])
    fig.canvas.draw()
    plt.close("all")
    for job in jobs[:1]:
        try:
            pd.read_excel(os.path.join(job["dir"], "table.xlsx"))
        except Exception:
            pass


def _run_corrected(jobs, fd, root, timeout):
    import select

    _matplotlib_39_pie()
    _warm_up(jobs)

    for job in jobs:
        _send(fd, {"id": job["id"], "event": "start"})
        start = time.monotonic()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _corrected_child(job, w, root, timeout)
        os.close(w)
        chunks, deadline, timed_out = [], start + timeout, False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([r], [], [], left)
            if ready:
                data = os.read(r, 65536)
                if not data:
                    break
                chunks.append(data)
        os.close(r)
        if timed_out:
            os.kill(pid, signal.SIGKILL)
        _, wstatus = os.waitpid(pid, 0)
        try:
            result = json.loads(b"".join(chunks).decode())
        except ValueError:
            why = "timeout" if timed_out else f"child died (wait status {wstatus})"
            result = {"ecr": False, "values": None, "error": why, "timeout": timed_out}
        result.update(id=job["id"], event="done", seconds=round(time.monotonic() - start, 3))
        _send(fd, result)


def main(argv):
    mode, jobs_path, fd, root, timeout = argv[1], argv[2], int(argv[3]), argv[4], float(argv[5])
    with open(jobs_path, encoding="utf-8") as fh:
        jobs = json.load(fh)
    if mode == "official":
        _run_official(jobs, fd, root, timeout)
    else:
        _run_corrected(jobs, fd, root, timeout)
    os.close(fd)


if __name__ == "__main__":
    main(sys.argv)
