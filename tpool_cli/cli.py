"""The `tpool` command line: parse options, call the library, print. No algorithm lives here."""

from __future__ import annotations

import sys
import warnings
from typing import Optional

import typer
from rich.markup import escape

from .errors import TpoolError
from .output import stderr

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="How much compute can a pretrained ViT shed by downsampling its tokens, and what does it cost in accuracy?",
)

def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: user mistakes become one red line on stderr and a non-zero exit, no traceback."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch/timm deprecation notes are not for our users
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        code = app(args=argv, standalone_mode=False)
    except TpoolError as exc:
        _fail(str(exc), 2)
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


def _fail(message: str, code: int) -> None:
    # the message is plain text (paths, exception texts like "[enforce fail at ...]"), not Rich markup
    stderr.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True, markup=True)
    sys.exit(code)


@app.callback()
def _root() -> None:
    """How much compute can a pretrained ViT shed by downsampling its tokens, and at what accuracy cost?"""


def _register_commands() -> None:
    """Import the command modules; each adds itself to ``app`` with @app.command()."""
    from .commands import bench, evaluate, finetune, pareto, profile, recon, report, visualize  # noqa: F401


_register_commands()
