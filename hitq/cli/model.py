"""`hitq model tiny DIR`: a tiny random Qwen3-VL that loads like the real one."""
from __future__ import annotations

import click


@click.group()
def model():
    """Model directory helpers.

    \b
    Example:
      hitq model tiny ./tiny-qwen3vl
    """


@model.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
def tiny(directory: str, seed: int):
    """Write a tiny random Qwen3-VL model directory (config, weights, tokenizer, processor).

    It loads with AutoProcessor / AutoModelForImageTextToText.from_pretrained and runs on a CPU.

    \b
    Example:
      hitq model tiny ./tiny-qwen3vl && hitq enqueue --model ./tiny-qwen3vl ...
    """
    from hitq.engine.tiny import build_tiny_model

    path = build_tiny_model(directory, seed=seed)
    click.echo(f"tiny Qwen3-VL model written to {path}")
