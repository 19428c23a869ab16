"""`tpool profile`: GMACs per layer with an operator inserted, vs. the baseline."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..cli_options import (
    FeaturesOpt, OpOptOpt, FormatOpt, ImgSizeOpt, InitOpt, ItersOpt, KeepOpt, LayersOpt, ModelOpt, OpsOpt, OutputOpt,
    PropAttnOpt, ScoreOpt, TokensOpt, WeightsOpt, op_options, parse_schedule_args, split_names,
)
from ..output import check_format, emit, make_table, stderr, token_path


def profile(
    model: ModelOpt = "deit_small_patch16_224",
    weights: WeightsOpt = None,
    op: OpsOpt = "topk",
    keep: KeepOpt = None,
    layers: LayersOpt = None,
    tokens: TokensOpt = None,
    img_size: ImgSizeOpt = None,
    prop_attn: PropAttnOpt = False,
    score: ScoreOpt = None,
    iters: ItersOpt = None,
    init: InitOpt = None,
    features: FeaturesOpt = None,
    op_opt: OpOptOpt = None,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
    detail: Annotated[Optional[bool], typer.Option("--detail/--no-detail", help="Per-layer tables (default: when one configuration).")] = None,
) -> None:
    """GMACs per layer with an operator inserted (fvcore; 1 multiply-add = 1 MAC), vs. the baseline."""
    from ..models import load_model
    from ..profile import build_configs, profile_configs

    check_format(fmt)
    keeps, layer_list, token_list = parse_schedule_args(keep, layers, tokens)
    options = op_options(op_opt, score=score, iters=iters, init=init, features=features)
    configs = build_configs(split_names(op), keeps, layer_list, token_list, **options)
    # FLOPs do not depend on the weights: without --weights the model is built without any
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
            (r["op"], r["schedule"], token_path([r["per_layer"][0]["tokens_in"]] + [layer["tokens_out"] for layer in r["per_layer"]]), r["gmacs"], r["operator_gmacs"], f"{r['reduction_pct']:.1f}")
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


