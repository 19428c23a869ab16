"""`tpool pareto`: operators x keep rates on one model and data set, decoded once, resumable."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.markup import escape

from ..cli import app
from ..cli_options import (
    FailBelowOpt,
    AmpOpt, BatchSizeOpt, ClassMapOpt, CompileOpt, DataOpt, DeviceOpt, FeaturesOpt, FormatOpt, ImgSizeOpt, InitOpt,
    ItersOpt, KeepOpt, LayersOpt, LimitOpt, DataModelOpt, OpsOpt, OutDirOpt, PropAttnOpt, RandomInitOpt, ScoreOpt, SeedOpt,
    ThreadsOpt, TokensOpt, WeightsOpt, WorkersOpt, op_options, split_names,
)
from ..errors import TpoolError
from ..output import check_format, stderr

ResumeOpt = Annotated[bool, typer.Option("--resume/--no-resume", help="Skip points already in OUT/results.jsonl.")]
CacheOpt = Annotated[str, typer.Option("--cache", help="Decoded images: auto, memory, or disk (memory-mapped under OUT/cache).")]
BenchOpt = Annotated[bool, typer.Option("--bench", help="Also time every point as `tpool bench` does (baseline and ideal in the same run); the speed plot uses these figures.")]
BenchBatchOpt = Annotated[Optional[int], typer.Option("--bench-batch-size", min=1, help="Synthetic batch of --bench (default: --batch-size).")]
BenchStepsOpt = Annotated[Optional[int], typer.Option("--bench-steps", min=1, help="Timed calls per run with --bench (default 50 on CUDA, 5 on CPU).")]
RetimeOpt = Annotated[bool, typer.Option("--retime", help="Time every point again with the bench pass (implies --bench), those already timed included; the newer figures win.")]
BenchRepeatsOpt = Annotated[Optional[int], typer.Option("--bench-repeats", min=1, help="Timed runs per point with --bench (default 3); the median is kept.")]


@app.command()
def pareto(
    model: DataModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    data: DataOpt = None,
    class_map: ClassMapOpt = None,
    ops: OpsOpt = "all",
    keep: KeepOpt = None,
    layers: LayersOpt = None,
    tokens: TokensOpt = None,
    img_size: ImgSizeOpt = None,
    prop_attn: PropAttnOpt = False,
    seed: SeedOpt = 0,
    score: ScoreOpt = None,
    iters: ItersOpt = None,
    init: InitOpt = None,
    features: FeaturesOpt = None,
    out: OutDirOpt = Path("runs/pareto"),
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    amp: AmpOpt = None,
    limit: LimitOpt = None,
    compile: CompileOpt = False,
    resume: ResumeOpt = True,
    cache: CacheOpt = "auto",
    bench: BenchOpt = False,
    bench_batch_size: BenchBatchOpt = None,
    bench_steps: BenchStepsOpt = None,
    bench_repeats: BenchRepeatsOpt = None,
    retime: RetimeOpt = False,
    threads: ThreadsOpt = None,
    fail_below: FailBelowOpt = None,
    fmt: FormatOpt = "table",
) -> None:
    """Sweep operators x keep rates (baseline included): accuracy per GMAC, Pareto frontier, tables, plots."""
    from ..bench import BenchSettings, timing_defaults
    from ..data import scan_folder
    from ..demo import DEMO_KEEPS, resolve_workload
    from ..device import resolve_amp, resolve_device
    from ..models import load_model
    from ..progress import RichSweepProgress
    from ..report import parse_gate
    from ..schedule import parse_float_list, parse_int_list
    from ..lock import SweepLock
    from ..sweep import DEFAULT_KEEPS, plan_points, run_sweep
    from ..threads import set_threads
    from .evaluate import RANDOM_WEIGHTS_NOTE
    from .report import finish_report

    check_format(fmt)
    set_threads(threads)
    bench = bench or retime
    if cache not in ("auto", "memory", "disk"):
        raise TpoolError(f"--cache must be auto, memory or disk, got {cache!r}")
    gates = [parse_gate(g) for g in fail_below or []]
    dev = resolve_device(device)
    resolve_amp(amp, dev)
    timing = None
    if bench:
        _, warmup, steps = timing_defaults(dev)
        timing = BenchSettings(
            batch_size=bench_batch_size or batch_size, img_size=img_size, amp=amp, compile=compile,
            warmup=warmup, steps=bench_steps or steps, repeats=bench_repeats or 3,
        )
    else:
        given = [name for name, value in (("--bench-batch-size", bench_batch_size), ("--bench-steps", bench_steps),
                                          ("--bench-repeats", bench_repeats)) if value is not None]
        if given:
            raise TpoolError(f"{', '.join(given)} {'goes' if len(given) == 1 else 'go'} with --bench")
    token_list = parse_int_list(tokens, "--tokens")
    if token_list is not None and keep is not None:
        raise TpoolError("give --keep or --tokens, not both")
    names = split_names(ops)  # bad --ops fail before the demo is announced
    work = resolve_workload(model, data, class_map, "pareto")
    model = work.model
    default_keeps = DEMO_KEEPS if work.demo else DEFAULT_KEEPS
    keeps = parse_float_list(keep, "--keep") if keep is not None else (None if token_list is not None else default_keeps)
    points = plan_points(
        names, keeps, parse_int_list(layers, "--layers"), token_list,
        **op_options(score=score, iters=iters, init=init, features=features),
    )
    folder = scan_folder(work.data, class_map=work.class_map, limit=limit)
    if random_init:
        torch.manual_seed(seed)  # the same random weights on every run, so a resumed sweep stays consistent
    loaded = load_model(model, weights=weights, random_init=random_init, img_size=img_size)
    if random_init:
        loaded.weights = f"random-init (seed {seed})"  # part of a result's identity: other seed, other weights
        stderr.print(f"[yellow]warning:[/yellow] {RANDOM_WEIGHTS_NOTE}")
    net = loaded.model
    for point in points:  # a bad --layers/--tokens fails here, before OUT is touched
        if point.schedule is not None:
            point.schedule.validate(len(net.blocks), net.patch_embed.num_patches)
    lock = SweepLock.acquire(out)  # noqa: F841  a second sweep on OUT fails here, before any work (lock.py)
    stderr.print(f"{len(points)} points ({len(points) - 1} + baseline) on {len(folder)} files -> {out}", highlight=False)

    with RichSweepProgress() as progress:
        result = run_sweep(
            loaded, folder, points, out, device=dev, amp=amp, batch_size=batch_size, workers=workers, resume=resume,
            compile=compile, prop_attn=prop_attn, seed=seed, cache=cache, bench=timing, retime=retime, progress=progress,
        )
    if result.reused:
        stderr.print(f"reused {result.reused} point(s) from {out / 'results.jsonl'}; evaluated {result.evaluated}")
    if result.benched:
        failed = f" ({result.bench_failures} could not be timed: see bench_error)" if result.bench_failures else ""
        stderr.print(f"timed {result.benched} point(s) with tpool bench{failed} -> {out / 'bench.jsonl'}", highlight=False)
    if result.skipped_files:
        stderr.print(f"[yellow]skipped {len(result.skipped_files)} unreadable file(s)[/yellow], e.g. {result.skipped_files[0]['path']}")
    if result.bench_interrupted:
        stderr.print("[yellow]interrupted during the bench pass:[/yellow] every accuracy point is kept; rerun the same command to time the rest")
    elif result.interrupted:
        stderr.print(f"[yellow]interrupted:[/yellow] {len(result.rows)} of {result.planned} points done; rerun the same command to resume")
    if not any(r["op"] == "none" for r in result.rows):
        sys.exit(130 if result.interrupted else 1)
    code = finish_report(out, result.rows, fmt, gates)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a") as fh:
            fh.write((out / "pareto.md").read_text() + "\n")
    if result.interrupted:
        sys.exit(130)
    if result.bench_failed:
        stderr.print(f"[red]error:[/red] {escape(result.bench_failed)}", highlight=False)
        sys.exit(1)
    if result.bench_failures:  # like `tpool bench`: an operator that cannot be timed is a bug to look at
        sys.exit(1)
    if code:
        sys.exit(code)
