"""Options shared by the commands, declared once (Typer reads the metadata from these aliases)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .errors import TpoolError
from .ops import get_operator_class, operator_names
from .schedule import parse_float_list, parse_int_list

ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU intra-op threads (default: torch's, one per core; or TPOOL_THREADS); see docs/benchmarks.md.")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="timm model name (ViT/DeiT family).")]
# Commands that run on data: no --model and no --data = the built-in demo (model + digits test images).
DataModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="timm model name (ViT/DeiT family); default deit_small_patch16_224 with --data, the built-in demo without."),
]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="Local .safetensors/.pth weights file.")]
RandomInitOpt = Annotated[bool, typer.Option("--random-init", help="Build the model without weights.")]
OpsOpt = Annotated[str, typer.Option("--op", "--ops", help=f"Operator(s), comma-separated, or all: {', '.join(operator_names())}.")]
KeepOpt = Annotated[Optional[str], typer.Option("--keep", help="Keep rate(s) in (0, 1] per reduction layer, comma-separated.")]
LayersOpt = Annotated[Optional[str], typer.Option("--layers", help="0-indexed blocks that reduce (default 3,6,9).")]
TokensOpt = Annotated[Optional[str], typer.Option("--tokens", help="Patch-token budget per reduction layer, or per block.")]
ImgSizeOpt = Annotated[Optional[int], typer.Option("--img-size", help="Input resolution (default: the model's).")]
PropAttnOpt = Annotated[bool, typer.Option("--prop-attn", help="Add log(token size) to attention logits (ToMe).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random operator.")]
# Operator options: each operator takes the ones it has (see docs/operators.md) and ignores the rest.
ScoreOpt = Annotated[Optional[str], typer.Option("--score", help="topk score: cls (class attention) or received (PoWER-BERT).")]
ItersOpt = Annotated[Optional[int], typer.Option("--iters", help="Clustering iterations (kmeans/kmedoids and weighted variants).")]
InitOpt = Annotated[Optional[str], typer.Option("--init", help="Clustering initialisation: significance (top-K) or farthest.")]
FeaturesOpt = Annotated[Optional[str], typer.Option("--features", help="What clustering compares: tokens or keys.")]
FormatOpt = Annotated[str, typer.Option("--format", "-f", help="table, json or csv (data on stdout).")]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write JSON/CSV here (by suffix).")]



# Running models on data (evaluate, pareto, bench, visualize).
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="ImageNet-style folder: DIR/<wnid or class>/<image>.")]
ClassMapOpt = Annotated[Optional[Path], typer.Option("--class-map", help="File with one class folder name per line; line i = class index i.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cuda or cpu.")]
AmpOpt = Annotated[Optional[str], typer.Option("--amp", help="bf16, fp16 or none (default: bf16 on CUDA, none on CPU).")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", "-j", min=0, help="DataLoader workers (default: from the CPU count).")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Use only the first N images (sorted order).")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the patched model (compile time reported apart).")]
OutDirOpt = Annotated[Path, typer.Option("--out", help="Output folder.")]
FailBelowOpt = Annotated[
    Optional[list[str]],
    typer.Option("--fail-below", help="OP@KEEP=TOP1: exit 1 if that point's top-1 is below TOP1 (repeatable)."),
]


def op_options(**options: Any) -> dict[str, Any]:
    """Operator options the user actually set (None = the operator's default)."""
    return {k: v for k, v in options.items() if v is not None}


def split_names(text: str) -> list[str]:
    """'topk, grid' -> ['topk', 'grid']; 'all' -> every method (not the baseline, not the speed reference)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise TpoolError("--ops is empty: name one or more operators, or all")
    if names == ["all"]:
        return [name for name in operator_names() if name not in ("none", "drop")]
    for name in names:
        get_operator_class(name)  # an unknown name fails here, before any model or data is touched
    return names


def parse_schedule_args(keep: Optional[str], layers: Optional[str], tokens: Optional[str], default_keep: float = 0.7):
    """(keeps, layers, tokens) from the CLI strings; keep defaults to ``default_keep`` without --tokens."""
    if keep is not None and tokens is not None:
        raise TpoolError("give --keep or --tokens, not both")
    keeps = parse_float_list(keep, "--keep") if keep is not None else None
    if keeps is None and tokens is None:
        keeps = (default_keep,)
    return keeps, parse_int_list(layers, "--layers"), parse_int_list(tokens, "--tokens")
