"""`tpool models`: the timm models matching a pattern, and whether tpool patches them."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..cli_options import FormatOpt, OutputOpt
from ..output import check_format, emit, make_table


def models(
    pattern: Annotated[Optional[str], typer.Argument(help="timm model name or shell pattern (vit_*, eva02_*); default: one model per ViT family.")] = None,
    gmacs: Annotated[bool, typer.Option("--gmacs/--no-gmacs", help="Count GMACs at the default resolution (torch counter, meta device).")] = True,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
) -> None:
    """timm models with whether tpool patches them, prefix tokens, pooling, position embedding, GMACs."""
    from ..catalog import describe_models

    check_format(fmt)
    rows = [info.row() for info in describe_models(pattern, gmacs=gmacs)]
    table = make_table(
        f"timm models matching {pattern}" if pattern else "timm ViT families (one model each; give a pattern for more)",
        ["model", "family", "tpool", "prefix tokens", "pooling", "position embedding", "img size", "GMACs"],
        [
            (
                r["model"], r["family"], "yes" if r["supported"] else "no", _text(r["prefix_tokens"]), _text(r["pooling"]),
                r["pos_embed"], _text(r["img_size"]), r["gmacs"] if r["gmacs"] is not None else "-",
            )
            for r in rows
        ],
        caption="GMACs: 1 multiply-add = 1 MAC, per image, no weights needed (docs/flops.md)",
    )
    reasons = make_table("not patched by tpool", ["model", "reason"], [(r["model"], r["reason"]) for r in rows if not r["supported"]])
    tables = [table] + ([reasons] if any(not r["supported"] for r in rows) else [])
    emit({"pattern": pattern, "models": rows}, rows, fmt, output, tables)


def _text(value: object) -> str:
    return "-" if value is None else str(value)
