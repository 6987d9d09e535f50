"""Atomic file writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from hitq.errors import HitqError


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write to a temp file beside `path`, fsync, then rename over it."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise HitqError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise HitqError(f"cannot write {path}: {e.strerror or e} (the previous file is unchanged)") from None
    return path


def write_atomic_many(files: dict[str | Path, str | bytes]) -> list[Path]:
    """Write several files so that a failure leaves all of the previous ones: every temp file is
    written and fsynced first (a full disk fails here, before anything is replaced), then renamed."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            raw = data.encode() if isinstance(data, str) else data
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    except OSError as e:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        where = e.filename or (staged[-1][1] if staged else next(iter(files), ""))
        raise HitqError(f"cannot write {where}: {e.strerror or e} (the previous files are unchanged)") from None
    return [path for _, path in staged]


def write_json_many(files: dict[str | Path, object]) -> list[Path]:
    """`write_atomic_many` for JSON documents."""
    return write_atomic_many({p: json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n" for p, obj in files.items()})
