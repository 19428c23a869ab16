"""The `tpool` command line: parse options, call the library, print. No algorithm lives here.

The command modules (:mod:`tpool_cli.commands`) hold plain functions; this module registers them
on :data:`app`, so neither imports the other both ways. Nothing heavy (torch, timm, fvcore,
matplotlib) is imported before a command runs: ``tpool --help`` and ``tpool CMD --help`` stay fast.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Optional

import typer
from rich.markup import escape

from .commands import bench, evaluate, finetune, models, ops, pareto, profile, recon, report, visualize
from .errors import TpoolError
from .output import stderr

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="How much compute can a pretrained ViT shed by downsampling its tokens, and what does it cost in accuracy?",
)


def version() -> str:
    """The installed tpool version ('unknown' when run from a source tree that is not installed)."""
    from importlib import metadata

    try:
        return metadata.version("tpool")
    except metadata.PackageNotFoundError:
        return "unknown"


class _StderrHandler(logging.Handler):
    """Library warnings (the ``tpool_cli`` logger) as one yellow line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        stderr.print(f"[yellow]warning:[/yellow] {escape(record.getMessage())}", highlight=False)


def _show_library_warnings() -> None:
    logger = logging.getLogger("tpool_cli")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler(logging.WARNING))
    logger.setLevel(logging.WARNING)
    logger.propagate = False


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: user mistakes become one red line on stderr and a non-zero exit, no traceback."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch/timm deprecation notes are not for our users
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    from .distributed import error_line, prepare_process

    quiet = prepare_process()  # under torchrun: ranks other than 0 print only errors
    if quiet:
        from . import output

        output.stdout.quiet = output.stderr.quiet = True
    _show_library_warnings()
    try:
        code = app(args=argv, standalone_mode=False)
    except TpoolError as exc:
        line = error_line(exc)  # under torchrun: said once, by rank 0 (distributed.error_line)
        stderr.quiet = False  # a quiet rank may still say its own error
        _fail(line, 2)
    except (typer.Abort, KeyboardInterrupt):
        stderr.print("[red]interrupted[/red]")
        sys.exit(130)
    except Exception as exc:
        # Usage errors of the click that Typer bundles (its classes differ between Typer versions)
        if not hasattr(exc, "format_message") or not hasattr(exc, "exit_code"):
            raise
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            sys.exit(0)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _fail(f"{exc.format_message()}{hint}", exc.exit_code or 2)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: Optional[str], code: int) -> None:
    # the message is plain text (paths, exception texts like "[enforce fail at ...]"), not Rich markup
    if message is not None:
        stderr.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True, markup=True)
    sys.exit(code)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"tpool {version()}")
        raise typer.Exit()


@app.callback(help=f"How much compute can a pretrained ViT shed by downsampling its tokens, and at what accuracy cost? (tpool {version()})")
def _root(
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the tpool version and exit."
    ),
) -> None:
    """How much compute can a pretrained ViT shed by downsampling its tokens, and at what accuracy cost?"""


for _command in (bench.bench, evaluate.evaluate, finetune.finetune, models.models, ops.ops, pareto.pareto, profile.profile, recon.recon,
                 report.report, visualize.visualize):
    app.command()(_command)
