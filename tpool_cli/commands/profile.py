"""`tpool profile`: GMACs per layer with an operator inserted, vs. the baseline."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..cli_options import (
    FeaturesOpt, KnnOpt, LinkageOpt, OpOptOpt, FormatOpt, ImgSizeOpt, InitOpt, ItersOpt, KeepOpt, LayersOpt, ModelOpt, OpsOpt, OutputOpt,
    PropAttnOpt, ROpt, ScoreOpt, TokensOpt, WeightsOpt, op_options, parse_schedule_args, split_names,
)
from ..errors import TpoolError
from ..output import check_format, emit, make_table, stderr, token_path


def profile(
    model: ModelOpt = "deit_small_patch16_224",
    weights: WeightsOpt = None,
    op: OpsOpt = "topk",
    keep: KeepOpt = None,
    layers: LayersOpt = None,
    tokens: TokensOpt = None,
    r: ROpt = None,
    img_size: ImgSizeOpt = None,
    prop_attn: PropAttnOpt = None,
    score: ScoreOpt = None,
    iters: ItersOpt = None,
    init: InitOpt = None,
    features: FeaturesOpt = None,
    linkage: LinkageOpt = None,
    knn: KnnOpt = None,
    op_opt: OpOptOpt = None,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
    detail: Annotated[Optional[bool], typer.Option("--detail/--no-detail", help="Per-layer tables (default: when one configuration).")] = None,
    counter: Annotated[str, typer.Option("--counter", help="FLOP counter: fvcore, torch (FlopCounterMode), or both (exit 1 if they differ by > 0.1% anywhere).")] = "fvcore",
) -> Optional[int]:
    """GMACs per layer with an operator inserted (1 multiply-add = 1 MAC), vs. the baseline."""
    from ..models import load_model
    from ..flops import AGREEMENT_TOLERANCE
    from ..profile import PROFILE_COUNTERS, build_configs, profile_configs

    check_format(fmt)
    if counter not in PROFILE_COUNTERS:
        raise TpoolError(f"unknown --counter {counter!r}; choose from {', '.join(PROFILE_COUNTERS)}")
    keeps, layer_list, token_list, rs = parse_schedule_args(keep, layers, tokens, r=r, sweep=True)
    options = op_options(op_opt, score=score, iters=iters, init=init, features=features, linkage=linkage, knn=knn)
    configs = build_configs(split_names(op), keeps, layer_list, token_list, rs, **options)
    # FLOPs do not depend on the weights: without --weights the model is built without any
    loaded = load_model(model, weights=weights, random_init=weights is None, img_size=img_size)
    results = profile_configs(loaded.model, configs, img_size=img_size, prop_attn=prop_attn, counter=counter)
    size = img_size or loaded.model.patch_embed.img_size[0]
    rows = [r.row(model, size) for r in results]
    for row in rows:
        row["weights"] = loaded.weights

    summary = make_table(
        f"{model} @ {size}px: GMACs per image ({rows[0]['counter']}, 1 multiply-add = 1 MAC)",
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
    if counter == "both":
        tables.append(_agreement_table(rows))
    for key, name in (("uncounted_ops", rows[0]["counter"]), ("torch_uncounted_ops", "torch")):
        uncounted = sorted({op_name for r in rows for op_name in r.get(key, {})})
        if uncounted:
            stderr.print(f"[dim]not counted by {name} (elementwise or selection ops, no multiply-adds): {', '.join(uncounted)}[/dim]")
    csv_rows = [{k: v for k, v in r.items() if k != "per_layer"} for r in rows]
    emit({"model": model, "img_size": size, "results": rows}, csv_rows, fmt, output, tables)
    worst = max(rows, key=lambda r: r.get("counters_max_rel_diff", 0.0))
    if counter == "both" and worst["counters_max_rel_diff"] > AGREEMENT_TOLERANCE:
        stderr.print(
            f"[red]counters disagree:[/red] {worst['op']} {worst['schedule']}: {100 * worst['counters_max_rel_diff']:.3f}% "
            f"at {worst['counters_max_diff_at']} (tolerance {100 * AGREEMENT_TOLERANCE:g}%)"
        )
        return 1
    return None


def _agreement_table(rows: list[dict]):
    return make_table(
        "fvcore vs torch FlopCounterMode (largest relative difference over every block column, stem, head, total)",
        ["op", "schedule", "fvcore GMACs", "torch GMACs", "max diff %", "at"],
        [
            (r["op"], r["schedule"], r["gmacs"], r["torch_gmacs"], f"{100 * r['counters_max_rel_diff']:.4f}", r["counters_max_diff_at"])
            for r in rows
        ],
    )


def _with_total(parts: list[float]) -> list[float]:
    from ..profile import rounded_parts

    shown = rounded_parts(parts)  # rounded so that the shown columns add up to the shown total
    return [*shown, round(sum(shown), 4)]


def _layer_table(row: dict):
    from ..profile import COLUMNS

    lines = [
        (l["layer"], l["tokens_in"], l["tokens_out"], *_with_total([l[c] for c in COLUMNS]))
        for l in row["per_layer"]
    ]
    lines.append(("all blocks", "", "", *_with_total([row[f"{c}_gmacs"] for c in COLUMNS])))
    lines.append(("stem + head", "", "", "", "", "", "", *_with_total([row["stem_gmacs"], row["head_gmacs"]])[-1:]))
    lines.append(("total", "", "", "", "", "", "", *_with_total([row["gmacs"]])[-1:]))
    return make_table(
        f"{row['op']} {row['schedule']}: {row['gmacs']:.4f} GMACs, {row['reduction_pct']:.1f}% below the baseline {row['baseline_gmacs']:.4f}",
        ["layer", "patch tokens in", "patch tokens out", "attention GMACs", "MLP GMACs", "operator GMACs", "other GMACs", "total GMACs"],
        lines,
        caption="attention: qkv, QK^T, AV, proj; operator: reducer + features computed only for it; other: norms, LayerScale (docs/flops.md)",
    )


