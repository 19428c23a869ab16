"""`tpool bench`: images per second of baseline, ideal (free reduction) and operator, on synthetic input."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..cli_options import (
    AmpOpt, CompileOpt, DeviceOpt, FeaturesOpt, KnnOpt, LinkageOpt, OpOptOpt, FormatOpt, ImgSizeOpt, InitOpt, ItersOpt, KeepOpt, LayersOpt, ModelOpt,
    OpsOpt, OutputOpt, PropAttnOpt, ROpt, ScoreOpt, SeedOpt, ThreadsOpt, TokensOpt, op_options, parse_schedule_args, split_names,
)
from ..output import check_format, emit, make_table, stderr, token_path

# Timing knobs of bench alone. Timed calls are --steps, not --iters: --iters is the clustering option.
BenchBatchOpt = Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Images per batch (default 256 on CUDA, 8 on CPU).")]
WarmupOpt = Annotated[Optional[int], typer.Option("--warmup", help="Untimed calls after the first (default 10 on CUDA, 3 on CPU).")]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="Timed calls per repeat (default 50 on CUDA, 5 on CPU).")]
RepeatsOpt = Annotated[int, typer.Option("--repeats", help="Timed runs; throughput is their median.")]
CompileModeOpt = Annotated[str, typer.Option("--compile-mode", help="torch.compile mode with --compile: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs.")]


def bench(
    model: ModelOpt = "deit_small_patch16_224",
    op: OpsOpt = "topk",
    keep: KeepOpt = None,
    layers: LayersOpt = None,
    tokens: TokensOpt = None,
    r: ROpt = None,
    img_size: ImgSizeOpt = None,
    batch_size: BenchBatchOpt = None,
    device: DeviceOpt = "auto",
    amp: AmpOpt = None,
    compile: CompileOpt = False,
    compile_mode: CompileModeOpt = "default",
    warmup: WarmupOpt = None,
    steps: StepsOpt = None,
    repeats: RepeatsOpt = 3,
    prop_attn: PropAttnOpt = None,
    seed: SeedOpt = 0,
    score: ScoreOpt = None,
    iters: ItersOpt = None,
    init: InitOpt = None,
    features: FeaturesOpt = None,
    linkage: LinkageOpt = None,
    knn: KnnOpt = None,
    op_opt: OpOptOpt = None,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
    threads: ThreadsOpt = None,
) -> int:
    """Images per second: the unpatched baseline, the ideal (same token counts, reduction free) and the operator.

    Random weights and synthetic images (speed depends on neither); the device is synchronised
    around every timed run. Ratios operator/baseline and operator/ideal come from one run.
    """
    from ..bench import BenchSettings, bench as run_bench, timing_defaults
    from ..device import resolve_amp, resolve_device
    from ..distributed import refuse
    from ..models import load_model
    from ..profile import build_configs
    from ..threads import set_threads

    check_format(fmt)
    refuse("tpool bench", "it times one device on synthetic batches, and copies timed at once on one node would "
           "measure their contention; run it once per GPU without torchrun (CUDA_VISIBLE_DEVICES=i tpool bench ...), "
           "or `torchrun ... -m tpool_cli evaluate` for the aggregate img/s of all ranks on real images")
    set_threads(threads)
    dev = resolve_device(device)
    resolve_amp(amp, dev)  # a bad --amp fails before the model is built
    default_batch, default_warmup, default_steps = timing_defaults(dev)
    settings = BenchSettings(
        batch_size=batch_size if batch_size is not None else default_batch,
        img_size=img_size,
        amp=amp,
        compile=compile,
        compile_mode=compile_mode,
        warmup=warmup if warmup is not None else default_warmup,
        steps=steps if steps is not None else default_steps,
        repeats=repeats,
    )
    keeps, layer_list, token_list, rs = parse_schedule_args(keep, layers, tokens, r=r, sweep=True)
    options = op_options(op_opt, score=score, iters=iters, init=init, features=features, linkage=linkage, knn=knn)
    configs = build_configs(split_names(op), keeps, layer_list, token_list, rs, **options)
    if not configs:
        from ..ops import make_operator
        from ..schedule import Schedule

        configs = [(make_operator("none"), Schedule(keep=1.0, layers=layer_list))]  # --op none: the baseline alone
    loaded = load_model(model, random_init=True, img_size=img_size)
    stderr.print(f"[dim]{model}, batch {settings.batch_size}, {dev}, compile={'on' if compile else 'off'}[/dim]")
    report = run_bench(
        loaded.model, configs, settings, dev, prop_attn=prop_attn, seed=seed, errors="record",
        progress=lambda m: stderr.print(f"[dim]{m}[/dim]"),
    )
    payload = report.payload(model)
    rows = payload["results"]
    compiled = settings.compile
    columns = ["op", "schedule", "patch tokens", "GMACs", "baseline img/s", "ideal img/s", "op img/s", "spread", "op/baseline", "op/ideal"]
    if compiled:
        columns += ["compile s (op)"]
    columns += ["notes"]
    lines = []
    for r in rows:
        line = [r["op"], r["schedule"], token_path(r["tokens_per_block"]), r["op_gmacs"] if r["op_gmacs"] is not None else "",
                _num(r["baseline_img_s"]), _num(r["ideal_img_s"]), _num(r["op_img_s"]) if not r["error"] else "failed",
                _pct(r["bench_spread"]), _ratio(r["op_vs_baseline"]), _ratio(r["op_vs_ideal"])]
        if compiled:
            line.append(f"{r['op_compile_s']:.1f}" if r["op_compile_s"] is not None else "")
        lines.append([*line, r["bench_flag"] or ""])
    base = payload["baseline"]
    caption = (
        f"{payload['device_name']}; batch {settings.batch_size}, amp {payload['amp']}, "
        f"{'torch.compile mode ' + compile_mode if compiled else 'eager'}; baseline {base['gmacs'] or 0:.4f} GMACs, "
        f"spread {_pct(base['bench_spread']) or '—'}{'; baseline ' + base['bench_flag'] if base['bench_flag'] else ''}; "
        f"median of {settings.repeats} runs of {settings.steps} calls; spread: (max − min) / median of the op's runs; "
        "notes: speed flags (noisy, busy machine: do not trust that figure)"
    )
    table = make_table(f"{model} @ {payload['img_size']}px: throughput (images/s)", columns, lines, caption=caption)
    for r in rows:
        if r["error"]:
            stderr.print(f"[red]{r['op']} {r['schedule']} failed:[/red] {r['error']}", highlight=False)
    emit(payload, rows, fmt, output, [table])
    return 1 if any(r["error"] for r in rows) else 0  # a failed operator is a bug: the rest still reported


def _num(value: Optional[float]) -> str:
    return "" if value is None else f"{value:,.1f}"


def _pct(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.0%}"


def _ratio(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.3f}"


