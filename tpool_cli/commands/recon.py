"""`tpool recon`: the reconstruction error each operator leaves per reducing layer, on real images."""

from __future__ import annotations

from typing import Annotated

import typer

from ..cli_options import (
    BatchSizeOpt, DataOpt, DeviceOpt, FeaturesOpt, KnnOpt, LinkageOpt, OpOptOpt, FormatOpt, InitOpt, ItersOpt, KeepOpt, LayersOpt, DataModelOpt,
    OpsOpt, OutputOpt, PropAttnOpt, ROpt, RandomInitOpt, ScoreOpt, SeedOpt, TokensOpt, WeightsOpt, op_options,
    parse_schedule_args, split_names,
)
from ..errors import TpoolError
from ..output import check_format, emit, make_table, stderr
from .common import announce

def recon(
    model: DataModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    op: OpsOpt = "all",
    keep: KeepOpt = None,
    layers: LayersOpt = None,
    tokens: TokensOpt = None,
    r: ROpt = None,
    prop_attn: PropAttnOpt = None,
    seed: SeedOpt = 0,
    score: ScoreOpt = None,
    iters: ItersOpt = None,
    init: InitOpt = None,
    features: FeaturesOpt = None,
    linkage: LinkageOpt = None,
    knn: KnnOpt = None,
    op_opt: OpOptOpt = None,
    data: DataOpt = None,
    limit: Annotated[int, typer.Option("--limit", help="Use the first N images (sorted paths).")] = 16,
    batch_size: BatchSizeOpt = 16,
    device: DeviceOpt = "auto",
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
) -> None:
    """Reconstruction error (Token Pooling's objective) per reducing layer, per operator, on images."""
    from ..device import resolve_device
    from ..distributed import is_main, local_device, reconstruction_on_folder  # sharded under torchrun
    from ..models import load_model, resolve_workload
    from ..profile import build_configs

    check_format(fmt)
    keeps, layer_list, token_list, rs = parse_schedule_args(keep, layers, tokens, r=r, sweep=True)
    options = op_options(op_opt, score=score, iters=iters, init=init, features=features, linkage=linkage, knn=knn)
    configs = build_configs(split_names(op), keeps, layer_list, token_list, rs, **options)
    if not configs:
        raise TpoolError("no reducing operator given (--op none reduces nothing)")
    work = resolve_workload(model, data, None, "recon")
    announce(work)
    model, data = work.model, work.data
    if not data.is_dir():  # fail before loading a model
        raise TpoolError(f"--data must be a folder of images: {data} " + ("is a file" if data.exists() else "not found"))
    import torch

    torch.manual_seed(seed)  # --random-init weights are then reproducible too
    loaded = load_model(model, weights=weights, random_init=random_init, device=local_device(resolve_device(device)))
    stderr.print(f"[dim]{model} ({loaded.weights}): {len(configs)} configuration(s) on up to {limit} image(s) from {data}[/dim]")
    rows = reconstruction_on_folder(
        loaded.model, data, configs, limit=limit, batch_size=batch_size, prop_attn=prop_attn, seed=seed
    )
    for row in rows:
        row["model"] = model
        row["weights"] = loaded.weights
    images = rows[0]["images"] if rows else 0
    table = make_table(
        f"{model}: reconstruction error per reducing layer (mean over {images} images, per original patch)",
        ["op", "schedule", "layer", "patch tokens in", "patch tokens out", "recon", "recon (significance-weighted)"],
        [(r["op"], r["schedule"], r["layer"], r["tokens_in"], r["tokens_out"], r["recon"], r["recon_weighted"]) for r in rows],
        caption="recon = sum_i s_i min_k ||x_i - y_k||^2 / sum_i s_i (s = token sizes); weighted: s_i x significance_i",
    )
    if is_main():  # under torchrun rank 0 alone prints
        emit({"model": model, "weights": loaded.weights, "images": images, "results": rows}, rows, fmt, output, [table])
