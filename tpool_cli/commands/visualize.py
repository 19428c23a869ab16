"""`tpool visualize`: figures of which image regions each operator keeps, pools or merges."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..cli_options import (
    FeaturesOpt, KnnOpt, LinkageOpt, OpOptOpt, ImgSizeOpt, InitOpt, ItersOpt, KeepOpt, LayersOpt, DataModelOpt, OpsOpt, OutDirOpt, PropAttnOpt, ROpt,
    RandomInitOpt, ScoreOpt, TokensOpt, WeightsOpt, op_options, parse_schedule_args, split_names,
)
from ..errors import TpoolError
from ..output import stderr


DEMO_FIGURES = 3  # demo digits drawn when no IMAGE is given


def visualize(
    images: Annotated[Optional[list[Path]], typer.Argument(metavar="IMAGE", help="Image files (any format PIL reads).", show_default=False)] = None,
    model: DataModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    op: OpsOpt = "all",
    keep: KeepOpt = None,
    layers: LayersOpt = None,
    tokens: TokensOpt = None,
    r: ROpt = None,
    img_size: ImgSizeOpt = None,
    prop_attn: PropAttnOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random operator and of --random-init weights.")] = 0,
    score: ScoreOpt = None,
    iters: ItersOpt = None,
    init: InitOpt = None,
    features: FeaturesOpt = None,
    linkage: LinkageOpt = None,
    knn: KnnOpt = None,
    op_opt: OpOptOpt = None,
    out: OutDirOpt = Path("tpool-visualize"),
    grid: Annotated[bool, typer.Option("--grid", help="One figure per image: a row per operator, a column per layer.")] = False,
    svg: Annotated[bool, typer.Option("--svg", help="Write SVG instead of PNG.")] = False,
    colours: Annotated[str, typer.Option("--colors", "--colours", help="Fill of merged groups: mean (mean image colour) or palette.")] = "mean",
    dpi: Annotated[int, typer.Option("--dpi", help="PNG resolution (dots per inch; a panel is 2.5 in wide).")] = 100,
    compact: Annotated[bool, typer.Option("--compact", help="256-colour PNG, 2-3x smaller (for docs and reports).")] = False,
) -> None:
    """Draw, per reduction layer, which patches each token stands for (merged, kept or pruned).

    `--ops all` (default) draws every method (not `none`, not the speed reference `drop`). Prints the written files.
    """
    from ..demo import DEMO_MODEL, demo_images
    from ..models import DEFAULT_MODEL, load_model
    from ..ops import make_operators
    from ..schedule import Schedule
    from ..data import check_image_paths, load_images
    from ..visualize import COLOUR_MODES, visualize as draw

    if not images:
        if model not in (None, DEMO_MODEL):
            raise TpoolError(f"give one or more IMAGE files to draw with {model} (the built-in demo images go with --model {DEMO_MODEL})")
        model, images = DEMO_MODEL, demo_images(DEMO_FIGURES)
        stderr.print(f"[cyan]built-in demo:[/cyan] {DEMO_MODEL} on its first {len(images)} test digits; pass IMAGE files and --model for your own", highlight=False)
    model = model or DEFAULT_MODEL
    names = split_names(op)
    if not names:
        raise TpoolError("--ops is empty")
    operators = make_operators(names, op_options(op_opt, score=score, iters=iters, init=init, features=features, linkage=linkage, knn=knn))
    keeps, layer_list, token_list, rs = parse_schedule_args(keep, layers, tokens, default_keep=0.5, r=r, sweep=False)
    if keeps is not None and len(keeps) > 1:
        raise TpoolError(f"visualize draws one schedule: give one --keep rate, got {len(keeps)}")
    if rs is not None and len(rs) > 1:
        raise TpoolError(f"visualize draws one schedule: give one --r schedule, got {len(rs)}")
    schedule = Schedule(keep=keeps[0] if keeps else None, layers=layer_list, tokens=token_list, r=rs[0] if rs else None)
    if colours not in COLOUR_MODES:
        raise TpoolError(f"--colors must be one of {', '.join(COLOUR_MODES)}, got {colours!r}")
    if not 10 <= dpi <= 600:
        raise TpoolError(f"--dpi must be between 10 and 600, got {dpi}")
    paths = check_image_paths(images)  # missing paths fail before the model is built
    if random_init:
        import torch

        torch.manual_seed(seed)  # random-init weights come from the global generator: same seed, same figure
    loaded = load_model(model, weights=weights, random_init=random_init, img_size=img_size)
    batch, config = load_images(paths, loaded.model)
    stderr.print(f"[dim]{model} ({loaded.weights}): {len(images)} image(s) x {len(names)} operator(s)[/dim]")
    weights_label = "random init" if random_init else f"weights: {Path(loaded.weights).name if loaded.weights_sha256 else loaded.weights}"
    written = draw(
        loaded.model,
        batch,
        [path.name for path in paths],
        operators,
        out,
        schedule=schedule,
        grid=grid,
        fmt="svg" if svg else "png",
        colours=colours,  # type: ignore[arg-type]
        caption=f"{model} ({weights_label}) · {schedule.describe(len(loaded.model.blocks))}",
        mean=config["mean"],
        std=config["std"],
        prop_attn=prop_attn,
        seed=seed,
        dpi=dpi,
        compact=compact,
    )
    sys.stdout.write("".join(f"{path}\n" for path in written))
