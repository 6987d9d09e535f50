"""`hitq demo`: the whole loop on a laptop CPU with the tiny model and generated sample data."""
from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("directory", default="hitq-demo", type=click.Path(file_okay=False))
@click.option("--modality", type=click.Choice(["text", "image", "mix"]), default="mix", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["html", "markdown", "latex", "csv", "json"]), default="html", show_default=True)
@click.pass_context
def demo(ctx: click.Context, directory: str, modality: str, fmt: str):
    """Build sample data and a tiny Qwen3-VL, then enqueue → work → export on a fresh SQLite file.

    Everything lands in DIRECTORY (default ./hitq-demo): data/, tiny-model/, hitq.db, results/.

    \b
    Example:
      hitq demo && hitq status --db hitq-demo/hitq.db
    """
    from hitq.benchmark.sample import write_sample
    from hitq.cli.queue import enqueue, export
    from hitq.cli.work import work
    from hitq.engine.tiny import build_tiny_model

    root = Path(directory).resolve()
    db_file = root / "hitq.db"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("hitq.db*"):
        stale.unlink()
    click.echo(f"[1/4] sample data in {root / 'data'}")
    data = write_sample(root / "data")
    click.echo(f"[2/4] tiny Qwen3-VL in {root / 'tiny-model'}")
    model = build_tiny_model(root / "tiny-model")
    db = f"sqlite:///{db_file}"
    click.echo("[3/4] enqueue and work (one CPU worker)")
    ctx.invoke(enqueue, data_dir=str(data), model_dir=str(model), modality=modality, fmt=fmt, run_name="demo",
               max_new_tokens=24, max_input_tokens=4000, db=db)
    ctx.invoke(work, gpu="cpu", run_name="demo", drain=True, lease_seconds=60.0, max_jobs=None, batch_size=4, procs=1,
               job_timeout=None, poll_seconds=0.2, db=db)
    click.echo("[4/4] export")
    ctx.invoke(export, run_name="demo", out_dir=str(root / "results"), db=db)
    click.echo(f"\nDone. Results: {root / 'results' / 'results.json'} (predictions: checkpoint.json)\n"
               f"Look around: hitq status --db {db_file}")

