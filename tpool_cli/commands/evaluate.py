"""`tpool evaluate`: top-1/top-5 and throughput of one configuration on an ImageNet-style folder."""

from __future__ import annotations

import sys
from typing import Any

from ..cli_options import (
    AmpOpt, BatchSizeOpt, ClassMapOpt, CompileOpt, DataOpt, DeviceOpt, FeaturesOpt, KnnOpt, LinkageOpt, OpOptOpt, FormatOpt, ImgSizeOpt, InitOpt,
    ItersOpt, KeepOpt, LayersOpt, LimitOpt, DataModelOpt, OpsOpt, OutputOpt, PropAttnOpt, ROpt, RandomInitOpt, ScoreOpt, SeedOpt,
    ThreadsOpt, TokensOpt, WeightsOpt, WorkersOpt, op_options, parse_schedule_args, split_names,
)
from ..errors import TpoolError
from ..output import check_format, emit, make_table, stderr, token_path
from .common import RANDOM_WEIGHTS_NOTE, announce, warn_random_weights


def evaluate(
    model: DataModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    data: DataOpt = None,
    class_map: ClassMapOpt = None,
    op: OpsOpt = "none",
    keep: KeepOpt = None,
    layers: LayersOpt = None,
    tokens: TokensOpt = None,
    r: ROpt = None,
    img_size: ImgSizeOpt = None,
    prop_attn: PropAttnOpt = None,
    seed: SeedOpt = 0,
    score: ScoreOpt = None,
    iters: ItersOpt = None,
    init: InitOpt = None,
    features: FeaturesOpt = None,
    linkage: LinkageOpt = None,
    knn: KnnOpt = None,
    op_opt: OpOptOpt = None,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    amp: AmpOpt = None,
    limit: LimitOpt = None,
    compile: CompileOpt = False,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Top-1/top-5, GMACs and images/s (model-only and end-to-end) of one operator at one keep rate."""
    from ..data import scan_folder
    from ..evaluate import evaluate as run_evaluate
    from ..device import resolve_amp, resolve_device
    from ..distributed import global_progress, is_main, local_device
    from ..flops import count_flops
    from ..models import load_model, resolve_workload
    from ..patch import capped_blocks, patch
    from ..profile import build_configs
    from ..progress import image_progress
    from ..threads import set_threads

    check_format(fmt)
    set_threads(threads)
    dev = local_device(resolve_device(device))  # under torchrun: cuda:LOCAL_RANK
    resolve_amp(amp, dev)
    names = split_names(op) or ["none"]
    if len(names) > 1:
        raise TpoolError(f"evaluate runs one operator, got {len(names)} ({op}); `tpool pareto --ops` sweeps several")
    keeps, layer_list, token_list, rs = parse_schedule_args(keep, layers, tokens, r=r, sweep=False)
    if keeps is not None and len(keeps) > 1:
        raise TpoolError(f"evaluate runs one keep rate, got {keep}; `tpool pareto --keep` sweeps several")
    if rs is not None and len(rs) > 1:
        raise TpoolError(f"evaluate runs one schedule, got {len(rs)} --r schedules; `tpool pareto --r` sweeps several")
    configs = build_configs(names, keeps, layer_list, token_list, rs, **op_options(op_opt, score=score, iters=iters, init=init, features=features, linkage=linkage, knn=knn))
    work = resolve_workload(model, data, class_map, "evaluate")
    announce(work)
    model = work.model
    folder = scan_folder(work.data, class_map=work.class_map, limit=limit)
    # seeded: the same random weights on every run, and the seed in the weights' name
    loaded = load_model(model, weights=weights, random_init=random_init, img_size=img_size, seed=seed)
    baseline_gmacs = count_flops(loaded.model).total
    if configs:
        operator, schedule = configs[0]
        patch(loaded.model, operator, schedule=schedule, prop_attn=prop_attn, seed=seed)
        for block, asked, done in capped_blocks(loaded.model):
            stderr.print(f"[dim]block {block}: --r asks {asked}, {operator.name} removes {done} (its cap)[/dim]", highlight=False)
    if random_init:
        warn_random_weights()

    with image_progress(f"{model} {names[0]}", len(folder)) as advance:
        result = run_evaluate(
            loaded, folder, device=dev, amp=amp, batch_size=batch_size, workers=workers, compile=compile,
            progress=global_progress(advance),  # under torchrun: every rank's images on rank 0's bar
        )

    row = result.row()
    row["baseline_gmacs"] = round(baseline_gmacs, 6)
    row["reduction_pct"] = round(100.0 * (1.0 - row["gmacs"] / baseline_gmacs), 3)
    if result.skipped:
        shown = ", ".join(s["path"] for s in result.skipped[:3]) + (" ..." if len(result.skipped) > 3 else "")
        stderr.print(f"[yellow]skipped {len(result.skipped)} unreadable file(s):[/yellow] {shown}", highlight=False)
    if result.interrupted:
        stderr.print(f"[yellow]interrupted:[/yellow] results cover {result.images} of {result.files} files")
    csv_row = {k: v for k, v in row.items() if k != "skipped_files"}
    csv_row["skipped_files"] = [s["path"] for s in result.skipped]
    if is_main():  # under torchrun rank 0 alone prints and writes --output
        emit(row, [csv_row], fmt, output, [_table(row)])
    if result.interrupted:
        sys.exit(130)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def _ci(ci: Any, images: int) -> str:
    """' (95% CI 96.41–99.23, 360 images)': the Wilson interval the row carries (stats.py)."""
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or any(v != v for v in ci):
        return ""
    return f" (95% CI {ci[0]:.2f}–{ci[1]:.2f}, {images:,} images)"


def _speed_note(row: dict[str, Any]) -> str:
    """The spread of the figure and, when flagged (noisy, busy machine), why (speedflags.py)."""
    spread = row.get("model_only_spread")
    text = f" (spread {spread:.0%})" if isinstance(spread, float) else ""
    flag = row.get("speed_flag")
    return text + (f" [yellow]flagged: {flag}[/yellow]" if flag else "")


def _table(row: dict[str, Any]):
    lines = [
        ("top-1 %", _fmt(row["top1"]) + _ci(row.get("top1_ci"), row["images"])),
        ("top-5 %", _fmt(row["top5"]) + _ci(row.get("top5_ci"), row["images"])),
        ("images", f"{row['images']:,} of {row['files']:,} files" + (" (interrupted)" if row["interrupted"] else "")),
        ("skipped (unreadable)", str(row["skipped"])),
        ("GMACs / image", f"{row['gmacs']:.4f} ({row['reduction_pct']:.1f}% below the baseline {row['baseline_gmacs']:.4f})"),
        ("patch tokens per block", token_path(row["patch_tokens"])),
        ("model-only img/s", _fmt(row["model_only_img_s"], 1) + _speed_note(row)),
        ("end-to-end img/s", _fmt(row["end_to_end_img_s"], 1)),
    ]
    if row["compile_s"] is not None:
        lines.append(("compile time s", _fmt(row["compile_s"])))
    weights = row["weights"] + (f" (sha256 {row['weights_sha256'][:12]})" if row["weights_sha256"] else "")
    table = make_table(f"{row['op']} {row['schedule']}", ["metric", "value"], lines)
    table.columns[1].justify = "left"
    table.add_section()
    config = [
        ("model", f"{row['model']} @ {row['img_size']}px"),
        ("weights", weights),
        ("device", f"{row['device_name']}, {row['dtype']}, batch {row['batch_size']}" + (", compiled" if row["compile"] else "")),
        ("data", f"{row['data']} ({row['label_space']})"),
        ("versions", f"torch {row['torch']}, timm {row['timm']}"),
    ]
    if row["random_init"]:
        config.insert(0, ("[bold red]note[/bold red]", f"[bold red]{RANDOM_WEIGHTS_NOTE}[/bold red]"))
    for name, value in config:
        table.add_row(name, value)
    return table


