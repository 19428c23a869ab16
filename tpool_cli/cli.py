"""The `tpool` command line: parse options, call the library, print. No algorithm lives here."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import TpoolError
from .ops import operator_names
from .output import check_format, emit, make_table, stderr
from .schedule import parse_float_list, parse_int_list

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="How much compute can a pretrained ViT shed by downsampling its tokens, and what does it cost in accuracy?",
)

# Options shared by the commands (Typer reads the metadata from these aliases).
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="timm model name (ViT/DeiT family).")]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="Local .safetensors/.pth weights file.")]
RandomInitOpt = Annotated[bool, typer.Option("--random-init", help="Build the model without weights.")]
OpsOpt = Annotated[str, typer.Option("--op", "--ops", help=f"Operator(s), comma-separated: {', '.join(operator_names())}.")]
KeepOpt = Annotated[Optional[str], typer.Option("--keep", help="Keep rate(s) in (0, 1] per reduction layer, comma-separated.")]
LayersOpt = Annotated[Optional[str], typer.Option("--layers", help="0-indexed blocks that reduce (default 3,6,9).")]
TokensOpt = Annotated[Optional[str], typer.Option("--tokens", help="Patch-token budget per reduction layer, or per block.")]
ImgSizeOpt = Annotated[Optional[int], typer.Option("--img-size", help="Input resolution (default: the model's).")]
PropAttnOpt = Annotated[bool, typer.Option("--prop-attn", help="Add log(token size) to attention logits (ToMe).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random operator.")]
ScoreOpt = Annotated[Optional[str], typer.Option("--score", help="topk score: cls (class attention) or received (PoWER-BERT).")]
FormatOpt = Annotated[str, typer.Option("--format", "-f", help="table, json or csv (data on stdout).")]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write JSON/CSV here (by suffix).")]


def _op_options(**options: object) -> dict[str, object]:
    return {k: v for k, v in options.items() if v is not None}


@app.command()
def profile(
    model: ModelOpt = "deit_small_patch16_224",
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    op: OpsOpt = "topk",
    keep: KeepOpt = None,
    layers: LayersOpt = None,
    tokens: TokensOpt = None,
    img_size: ImgSizeOpt = None,
    prop_attn: PropAttnOpt = False,
    score: ScoreOpt = None,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
    detail: Annotated[Optional[bool], typer.Option("--detail/--no-detail", help="Per-layer tables (default: when one configuration).")] = None,
) -> None:
    """GMACs per layer with an operator inserted (fvcore; 1 multiply-add = 1 MAC), vs. the baseline."""
    from .models import load_model
    from .profile import build_configs, profile_configs

    check_format(fmt)
    ops = [name.strip() for name in op.split(",") if name.strip()]
    keeps = parse_float_list(keep, "--keep") if keep is not None else None
    if keeps is None and tokens is None:
        keeps = (0.7,)
    configs = build_configs(ops, keeps, parse_int_list(layers, "--layers"), parse_int_list(tokens, "--tokens"), **_op_options(score=score))
    loaded = load_model(model, weights=weights, random_init=weights is None, img_size=img_size)
    results = profile_configs(loaded.model, configs, img_size=img_size, prop_attn=prop_attn)
    size = img_size or loaded.model.patch_embed.img_size[0]
    rows = [r.row(model, size) for r in results]
    for row in rows:
        row["weights"] = loaded.weights

    summary = make_table(
        f"{model} @ {size}px: GMACs per image (fvcore, 1 multiply-add = 1 MAC)",
        ["op", "schedule", "patch tokens per block", "GMACs", "operator GMACs", "reduction %"],
        [
            (r["op"], r["schedule"], _token_path(r["per_layer"]), r["gmacs"], r["operator_gmacs"], f"{r['reduction_pct']:.1f}")
            for r in rows
        ],
        caption=f"params {rows[0]['params'] / 1e6:.2f} M; {rows[0]['num_prefix_tokens']} prefix token(s) on top of the patch tokens",
    )
    tables = [summary]
    if detail or (detail is None and len(rows) == 2):
        tables += [_layer_table(r) for r in rows[1:]]
    uncounted = sorted({op_name for r in rows for op_name in r["uncounted_ops"]})
    if uncounted:
        stderr.print(f"[dim]not counted (elementwise or selection ops, no multiply-adds): {', '.join(uncounted)}[/dim]")
    csv_rows = [{k: v for k, v in r.items() if k != "per_layer"} for r in rows]
    emit({"model": model, "img_size": size, "results": rows}, csv_rows, fmt, output, tables)


def _token_path(per_layer: list[dict]) -> str:
    counts = [per_layer[0]["tokens_in"]] + [layer["tokens_out"] for layer in per_layer if layer["tokens_out"] != layer["tokens_in"]]
    return "→".join(map(str, counts))


def _layer_table(row: dict):
    lines = [
        (l["layer"], l["tokens_in"], l["tokens_out"], l["attention"], l["mlp"], l["operator"], l["total"])
        for l in row["per_layer"]
    ]
    lines.append(("stem + head", "", "", "", "", "", row["stem_gmacs"] + row["head_gmacs"]))
    lines.append(("total", "", "", "", "", row["operator_gmacs"], row["gmacs"]))
    return make_table(
        f"{row['op']} {row['schedule']}: {row['gmacs']:.4f} GMACs, {row['reduction_pct']:.1f}% below the baseline {row['baseline_gmacs']:.4f}",
        ["layer", "patch tokens in", "patch tokens out", "attention GMACs", "MLP GMACs", "operator GMACs", "total GMACs"],
        lines,
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
    stderr.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True, markup=True)
    sys.exit(code)


@app.callback()
def _root() -> None:
    """How much compute can a pretrained ViT shed by downsampling its tokens, and at what accuracy cost?"""
