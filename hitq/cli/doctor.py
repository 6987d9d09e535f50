"""`hitq doctor`: check a setup before a long run, one line per check, exit 1 if any fails.

Checks: the database is reachable and migrated; the model directory looks loadable (config.json
with a known architecture, tokenizer and weight files; torch is not imported); the dataset's QA
file and the tables of the chosen format are present (not Git LFS pointers); the GPUs visible and
their free memory (`nvidia-smi`; none is only a failure with --require-gpu); free disk space
where exports go.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import click

from hitq.cli.options import db_option

KNOWN_ARCHITECTURES = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
                       "Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
MIN_FREE_DISK_BYTES = 1 << 30  # exports of a full run are tens of MB; below 1 GiB something else will fill it


def check_database(db: str) -> tuple[bool, str]:
    from hitq.jobqueue import database

    try:
        engine = database.create(database.url_from_env(db))
        current, head = database.current_revision(engine), database.head_revision()
    except Exception as e:  # any failure is the check's answer, never a traceback
        return False, str(e).splitlines()[0] if str(e) else type(e).__name__
    where = database.mask(database.normalize_url(database.url_from_env(db)))
    if current is None:
        return True, f"{where} reachable, empty (migrated to {head} on first use)"
    if current != head:
        return False, f"{where} at revision {current}, newest is {head}: run `hitq db upgrade`"
    return True, f"{where} reachable, at revision {current}"


def check_model(model: str) -> tuple[bool, str]:
    path = Path(model).expanduser()
    if not path.is_dir():
        return False, f"{path} is not a directory"
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False, f"{path} has no config.json: not a transformers model directory"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return False, f"{path}/config.json is unreadable: {e}"
    arch = (config.get("architectures") or ["?"])[0] if isinstance(config, dict) else "?"
    if arch not in KNOWN_ARCHITECTURES:
        return False, f"{path}: architecture {arch!r} is not one hitq runs ({', '.join(KNOWN_ARCHITECTURES[:1])} …)"
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return False, f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)})"
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    if not weights:
        return False, f"{path} has no weights (*.safetensors)"
    pointers = [w.name for w in weights if _is_lfs_pointer(w)]
    if pointers:
        return False, f"{path}: {len(pointers)} weight file(s) are Git LFS pointers, e.g. {pointers[0]}: run `git lfs pull`"
    size = sum(w.stat().st_size for w in weights)
    return True, f"{path}: {arch}, {len(weights)} weight file(s), {size / 2**30:.1f} GiB"


def check_data(data: str, fmt: str | None) -> tuple[bool, str]:
    from hitq.benchmark import qa

    try:
        queries = qa.load_queries(str(Path(data).expanduser()), None, "gold")
    except Exception as e:
        return False, str(e).splitlines()[0] if str(e) else type(e).__name__
    formats = [fmt] if fmt else ["html", "markdown", "latex", "csv", "json"]
    from hitq.benchmark.tables import problem, table_path

    missing = {}
    for f in formats:
        files = {q.file_name for q in queries}
        missing[f] = sorted(name for name in files if problem(table_path(Path(data).expanduser(), f, name)))
    bad = {f: names for f, names in missing.items() if names}
    if bad:
        f, names = next(iter(bad.items()))
        return False, f"{len(queries)} queries; {len(names)} {f} table(s) missing or LFS pointers, e.g. {names[0]}"
    return True, f"{len(queries)} queries; every {'/'.join(formats)} table present"


def check_gpus(require: bool) -> tuple[bool, str]:
    if not shutil.which("nvidia-smi"):
        return not require, "no GPU visible (nvidia-smi not found)" + ("" if require else ": CPU only")
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.free,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"nvidia-smi failed: {e}"
    rows = [[c.strip() for c in line.split(",")] for line in out.stdout.strip().splitlines() if line.strip()]
    if out.returncode or not rows:
        return not require, "no GPU visible" + (f" ({out.stderr.strip().splitlines()[0]})" if out.stderr.strip() else "")
    gpus = "; ".join(f"{i}: {name} {int(free) / 1024:.0f}/{int(total) / 1024:.0f} GiB free" for i, (name, free, total) in enumerate(rows))
    return True, f"{len(rows)} GPU(s): {gpus}"


def check_disk(out: str) -> tuple[bool, str]:
    path = Path(out).expanduser().resolve()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < MIN_FREE_DISK_BYTES:
        return False, f"{path}: only {free / 2**20:.0f} MiB free (want at least {MIN_FREE_DISK_BYTES >> 20} MiB)"
    return True, f"{path}: {free / 2**30:.1f} GiB free"


def _is_lfs_pointer(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(23) == b"version https://git-lfs"
    except OSError:
        return False


@click.command()
@db_option
@click.option("--model", "model_dir", type=click.Path(), help="Model directory to check.")
@click.option("--data", "data_dir", type=click.Path(), help="RealHiTBench directory to check.")
@click.option("--format", "fmt", type=click.Choice(["html", "markdown", "latex", "csv", "json"]), help="Only this table format.")
@click.option("--out", "out_dir", default=".", show_default=True, type=click.Path(), help="Where exports will go (disk space).")
@click.option("--require-gpu", is_flag=True, help="Fail when no GPU is visible.")
def doctor(db, model_dir, data_dir, fmt, out_dir, require_gpu):
    """Check a setup before a long run: database, model, data, GPUs, disk. Exit 1 if a check fails.

    \b
    Example:
      hitq doctor --db postgresql://hitq@dbhost/hitq --model ~/models/Qwen3-VL-8B-Instruct \\
                  --data ~/RealHiTBench --format html --out results/ --require-gpu
    """
    checks = [("database", lambda: check_database(db))]
    if model_dir:
        checks.append(("model", lambda: check_model(model_dir)))
    if data_dir:
        checks.append(("data", lambda: check_data(data_dir, fmt)))
    checks += [("gpu", lambda: check_gpus(require_gpu)), ("disk", lambda: check_disk(out_dir))]
    failed = 0
    for name, check in checks:
        ok, reason = check()
        failed += not ok
        click.echo(f"{'ok  ' if ok else 'FAIL'} {name:<9} {reason}")
    if failed:
        raise click.ClickException(f"{failed} check(s) failed")
