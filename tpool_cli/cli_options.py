"""Options shared by the commands, declared once (Typer reads the metadata from these aliases).

Nothing here imports torch: ``tpool --help`` renders these without loading a model library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .errors import TpoolError
from .schedule import parse_float_list, parse_int_list, parse_r

ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU intra-op threads (default: torch's, one per core; or TPOOL_THREADS); see docs/benchmarks.md.")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="timm model name (ViT/DeiT family).")]
# Commands that run on data: no --model and no --data = the built-in demo (model + digits test images).
DataModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="timm model name (ViT/DeiT family); default deit_small_patch16_224 with --data, the built-in demo without."),
]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="Local .safetensors/.pth weights file.")]
RandomInitOpt = Annotated[bool, typer.Option("--random-init", help="Build the model without weights.")]
OpsOpt = Annotated[str, typer.Option("--op", "--ops", help="Operator(s), comma-separated, or all (`tpool ops` lists them with their options).")]
KeepOpt = Annotated[Optional[str], typer.Option("--keep", help="Keep rate(s) in (0, 1] per reduction layer, comma-separated.")]
LayersOpt = Annotated[Optional[str], typer.Option("--layers", help="0-indexed blocks that reduce (default 3,6,9).")]
TokensOpt = Annotated[Optional[str], typer.Option("--tokens", help="Patch-token budget per reduction layer, or per block.")]
ImgSizeOpt = Annotated[Optional[int], typer.Option("--img-size", help="Input resolution (default: the model's).")]
PropAttnOpt = Annotated[
    Optional[bool],
    typer.Option("--prop-attn/--no-prop-attn", help="Add log(token size) to attention logits (ToMe's proportional attention); default: the operator's reference setting (on for tome, atc and mctf, off for the others).", show_default=False),
]
ROpt = Annotated[
    Optional[str],
    typer.Option("--r", help="Tokens removed in every block (ToMe's r): R, or one per block R1,R2,...; ';' separates schedules (see docs/cli.md)."),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random operator.")]
# Operator options: any field of the selected operator(s) through --op-opt KEY=VALUE; with several
# operators each takes the ones it has (a key none of them has is an error naming the valid ones).
OpOptOpt = Annotated[
    Optional[list[str]],
    typer.Option("--op-opt", metavar="KEY=VALUE", help="Operator option (repeatable), e.g. iters=3; `tpool ops` lists each operator's options."),
]
# Named aliases of the --op-opt keys users type most (the papers' own option names); --op-opt reaches every field.
ScoreOpt = Annotated[Optional[str], typer.Option("--score", help="= --op-opt score=...: topk score, cls (class attention) or received (PoWER-BERT).")]
ItersOpt = Annotated[Optional[int], typer.Option("--iters", help="= --op-opt iters=...: clustering iterations (kmeans/kmedoids and weighted variants).")]
InitOpt = Annotated[Optional[str], typer.Option("--init", help="= --op-opt init=...: clustering initialisation, significance (top-K) or farthest.")]
FeaturesOpt = Annotated[Optional[str], typer.Option("--features", help="= --op-opt features=...: what clustering compares, tokens or keys.")]
LinkageOpt = Annotated[Optional[str], typer.Option("--linkage", help="= --op-opt linkage=...: atc's cluster distance, average (default), complete or single.")]
KnnOpt = Annotated[Optional[int], typer.Option("--knn", help="= --op-opt knn=...: dpcknn's neighbours for the density (default 5).")]
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


def op_options(op_opt: Optional[list[str]] = None, **aliases: Any) -> dict[str, Any]:
    """Operator options the user set: ``--op-opt KEY=VALUE`` pairs and the named aliases (None = not given).

    Values stay text here; :func:`tpool_cli.ops.make_operators` parses them by each option's type
    and checks the keys against the selected operators. A key given twice with different values
    (``--iters 3 --op-opt iters=4``) is an error.
    """
    options = {k: v for k, v in aliases.items() if v is not None}
    for pair in op_opt or []:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise TpoolError(f"--op-opt takes KEY=VALUE, got {pair!r}")
        if key in options and str(options[key]) != value:
            raise TpoolError(f"operator option {key} given twice ({options[key]!r} and {value!r})")
        options[key] = value
    return options


def split_names(text: str) -> list[str]:
    """'topk, grid' -> ['topk', 'grid']; 'all' -> every method (not the baseline, not the speed reference)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise TpoolError("--ops is empty: name one or more operators, or all")
    from .ops import get_operator_class, operator_names

    if names == ["all"]:
        return [name for name in operator_names() if name not in ("none", "drop")]
    for name in names:
        get_operator_class(name)  # an unknown name fails here, before any model or data is touched
    return names


def parse_schedule_args(
    keep: Optional[str], layers: Optional[str], tokens: Optional[str], default_keep: Optional[float] = 0.7,
    r: Optional[str] = None, sweep: bool = True,
):
    """(keeps, layers, tokens, rs) from the CLI strings; keep defaults to ``default_keep`` without
    --tokens or --r. ``sweep``: the command runs several schedules, so '--r 4,8' is two points
    (see :func:`tpool_cli.schedule.parse_r`)."""
    given = [name for name, value in (("--keep", keep), ("--tokens", tokens), ("--r", r)) if value is not None]
    if len(given) > 1:
        raise TpoolError(f"give one of --keep, --tokens or --r, not both {given[0]} and {given[1]}")
    if r is not None and layers is not None:
        raise TpoolError("--layers goes with --keep or --tokens; --r gives one value, or one per block")
    keeps = parse_float_list(keep, "--keep") if keep is not None else None
    if keeps is None and tokens is None and r is None and default_keep is not None:
        keeps = (default_keep,)
    return keeps, parse_int_list(layers, "--layers"), parse_int_list(tokens, "--tokens"), parse_r(r, sweep)
