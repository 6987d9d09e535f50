"""`hitq` entry point: the command group and the one error boundary.

Library code raises hitq.errors.HitqError subclasses and never prints; here each becomes one
line on stderr and exit status 1. Unexpected exceptions also become one line, with the
traceback only under --debug.
"""
from __future__ import annotations

import sys

import click

from hitq import __version__
from hitq.errors import HitqError


class HitqGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HitqError as e:
            raise click.ClickException(str(e)) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, KeyboardInterrupt):
            raise
        except UnicodeError as e:  # text from an input file that is not valid Unicode (a lone surrogate, a bad byte)
            if ctx.obj and ctx.obj.get("debug"):
                raise
            bad = e.object[e.start:e.end] if isinstance(e, (UnicodeEncodeError, UnicodeDecodeError)) else ""
            raise click.ClickException(f"the input holds text that is not valid Unicode ({bad!r}: {e.reason}): fix the file") from None
        except OSError as e:  # the file system refused (a name too long, permissions, a full disk)
            if ctx.obj and ctx.obj.get("debug"):
                raise
            name = str(e.filename or "")
            name = name if len(name) <= 200 else name[:100] + "…" + name[-60:]
            reason = e.strerror or str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise click.ClickException(f"{reason}{': ' + name if name else ''}") from None
        except Exception as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise click.ClickException(f"unexpected {type(e).__name__}: {first} (run `hitq --debug …` for the traceback)") from None


@click.group(cls=HitqGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hitq")
@click.option("--debug", is_flag=True, help="Show tracebacks for unexpected errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool):
    """Run vision-language-model benchmarks (RealHiTBench) as a durable job queue.

    \b
    Example:
      hitq demo
      hitq enqueue --data ~/RealHiTBench --model ~/models/Qwen3-VL-8B-Instruct --modality mix --format html
      hitq work --gpu 0..3
    """
    ctx.ensure_object(dict)["debug"] = debug


def _register() -> None:
    from hitq.cli import bench, db, demo, doctor, model, queue, work

    for command in (
        queue.enqueue, queue.status, queue.requeue_errors, queue.export, queue.import_checkpoint,
        work.work, db.db, model.model, demo.demo, doctor.doctor, bench.bench,
    ):
        cli.add_command(command)
    try:
        from hitq.cli import preflight

        cli.add_command(preflight.preflight)
    except ImportError:
        pass
    try:
        from hitq.cli import evaluate

        cli.add_command(evaluate.eval_command, "eval")
        cli.add_command(evaluate.report)
    except ImportError:
        pass


_register()


def main() -> None:
    cli(prog_name="hitq")


if __name__ == "__main__":
    sys.exit(main())
