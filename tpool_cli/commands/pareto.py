"""`tpool pareto`: operators x keep rates on one model and data set, decoded once, resumable."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape

from ..cli_options import (
    FailBelowOpt,
    AmpOpt, BatchSizeOpt, ClassMapOpt, CompileOpt, DataOpt, DeviceOpt, FeaturesOpt, KnnOpt, LinkageOpt, OpOptOpt, FormatOpt, ImgSizeOpt, InitOpt,
    ItersOpt, KeepOpt, LayersOpt, LimitOpt, DataModelOpt, OpsOpt, OutDirOpt, PropAttnOpt, ROpt, RandomInitOpt, ScoreOpt, SeedOpt,
    ThreadsOpt, TokensOpt, WeightsOpt, WorkersOpt, op_options, parse_schedule_args, split_names,
)
from ..errors import TpoolError
from ..output import check_format, stderr
from .common import announce, finish_report, warn_random_weights

if TYPE_CHECKING:  # pragma: no cover
    from ..sweep import SweepResult

ResumeOpt = Annotated[bool, typer.Option("--resume/--no-resume", help="Skip points already in OUT/results.jsonl.")]
CacheOpt = Annotated[str, typer.Option("--cache", help="Decoded images: auto, memory, or disk (memory-mapped under OUT/cache).")]
BenchOpt = Annotated[bool, typer.Option("--bench", help="Also time every point as `tpool bench` does (baseline and ideal in the same run); the speed plot uses these figures.")]
BenchBatchOpt = Annotated[Optional[int], typer.Option("--bench-batch-size", min=1, help="Synthetic batch of --bench (default: --batch-size).")]
BenchStepsOpt = Annotated[Optional[int], typer.Option("--bench-steps", min=1, help="Timed calls per run with --bench (default 50 on CUDA, 5 on CPU).")]
RetimeOpt = Annotated[bool, typer.Option("--retime", help="Time every point again with the bench pass (implies --bench), those already timed included; the newer figures win.")]
FinetuneEpochsOpt = Annotated[int, typer.Option("--finetune-epochs", min=0, help="Also fine-tune every reducing point for E epochs with its operator in place (tpool finetune's recipe) and evaluate it: the frontier off the shelf and after E epochs side by side (0: off the shelf only).")]
TrainOpt = Annotated[Optional[Path], typer.Option("--train", help="Train folder of --finetune-epochs (same classes and class map as --data; default on the demo: its training split).")]
FinetuneLrOpt = Annotated[Optional[float], typer.Option("--finetune-lr", help="Peak learning rate of --finetune-epochs (default 1e-4, the demo 5e-4).")]
FinetuneStepsOpt = Annotated[Optional[int], typer.Option("--finetune-max-steps", min=1, help="Stop each point's fine-tune after this many updates (a quick try).")]
FinetuneBatchOpt = Annotated[Optional[int], typer.Option("--finetune-batch-size", min=1, help="Images per update of --finetune-epochs (default 64).")]
BenchRepeatsOpt = Annotated[Optional[int], typer.Option("--bench-repeats", min=1, help="Timed runs per point with --bench (default 3); the median is kept.")]


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
    finetune_epochs: FinetuneEpochsOpt = 0,
    train: TrainOpt = None,
    finetune_lr: FinetuneLrOpt = None,
    finetune_max_steps: FinetuneStepsOpt = None,
    finetune_batch_size: FinetuneBatchOpt = None,
    threads: ThreadsOpt = None,
    fail_below: FailBelowOpt = None,
    fmt: FormatOpt = "table",
) -> None:
    """Sweep operators x keep rates (baseline included): accuracy per GMAC, Pareto frontier, tables, plots."""
    from ..data import scan_folder
    from ..device import resolve_amp, resolve_device
    from ..distributed import is_main, local_device, refuse
    from ..models import load_model, resolve_workload
    from ..progress import RichSweepProgress
    from ..report import parse_gate
    from ..sweep import run_sweep
    from ..sweep_bench import sweep_bench_settings
    from ..sweep_finetune import sweep_finetune_settings, train_folder, with_finetuned
    from ..sweep_plan import plan_points, sweep_keeps, validate_points
    from ..lock import SweepLock
    from ..threads import set_threads

    # 1. the request, checked before the demo is announced or a model is built
    check_format(fmt)
    set_threads(threads)
    bench = bench or retime
    if cache not in ("auto", "memory", "disk"):
        raise TpoolError(f"--cache must be auto, memory or disk, got {cache!r}")
    gates = [parse_gate(g) for g in fail_below or []]
    dev = local_device(resolve_device(device))  # under torchrun: cuda:LOCAL_RANK
    resolve_amp(amp, dev)
    if bench:
        refuse("--bench", "sweep without it under torchrun, then run the same `tpool pareto ... --bench` on one GPU "
               "with the same --out: it reuses every accuracy point and times them on one device")
    timing = sweep_bench_settings(
        dev, enabled=bench, batch_size=batch_size, img_size=img_size, amp=amp, compile=compile,
        bench_batch_size=bench_batch_size, bench_steps=bench_steps, bench_repeats=bench_repeats,
    )
    keeps, layer_list, token_list, rs = parse_schedule_args(keep, layers, tokens, default_keep=None, r=r, sweep=True)
    names = split_names(ops)
    options = op_options(op_opt, score=score, iters=iters, init=init, features=features, linkage=linkage, knn=knn)
    from ..ops import make_operators

    make_operators(names, options)  # an option no selected operator has fails here, before the demo is announced
    # 2. the workload, the plan and the model (a bad schedule fails here, before OUT is touched)
    work = resolve_workload(model, data, class_map, "pareto")
    announce(work)
    recipe = sweep_finetune_settings(finetune_epochs, work.demo, lr=finetune_lr, max_steps=finetune_max_steps,
                                     batch_size=finetune_batch_size, seed=seed)
    points = plan_points(names, sweep_keeps(keeps, token_list, work.demo, rs), layer_list, token_list, rs, **options)
    points = with_finetuned(points, recipe)
    folder = scan_folder(work.data, class_map=work.class_map, limit=limit)
    train_data = train_folder(train, work.demo, work.class_map, recipe)
    # seeded: the same random weights on every run, so a resumed sweep stays consistent
    loaded = load_model(work.model, weights=weights, random_init=random_init, img_size=img_size, seed=seed)
    if random_init:
        warn_random_weights()
    validate_points(points, loaded.model)
    lock = SweepLock.acquire(out) if is_main() else None  # noqa: F841  a second sweep on OUT fails here, before any work (lock.py)
    tuned = sum(p.finetune is not None for p in points)
    stderr.print(f"{len(points)} points ({len(points) - 1} + baseline) on {len(folder)} files -> {out}"
                 + (f"; {tuned} fine-tuned for {finetune_epochs} epoch(s) on {len(train_data)} training files" if tuned else ""),
                 highlight=False)
    # 3. the sweep, then what it did, the report and the exit code
    with RichSweepProgress() as progress:
        result = run_sweep(
            loaded, folder, points, out, device=dev, amp=amp, batch_size=batch_size, workers=workers, resume=resume,
            compile=compile, prop_attn=prop_attn, seed=seed, cache=cache, bench=timing, retime=retime, train=train_data,
            progress=progress,
        )
    if not is_main():  # under torchrun rank 0 alone reports and writes the tables and plots
        sys.exit(130 if result.interrupted else 0)
    _say_what_was_done(result, out)
    if not any(r["op"] == "none" for r in result.rows):
        sys.exit(130 if result.interrupted else 1)
    code = finish_report(out, result.rows, fmt, gates)
    _append_step_summary(out)
    sys.exit(_exit_code(result, code))


def _say_what_was_done(result: "SweepResult", out: Path) -> None:
    """Points reused and timed, files skipped, and how an interrupted sweep resumes."""
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


def _append_step_summary(out: Path) -> None:
    """In GitHub Actions, the sweep's pareto.md goes into the job summary."""
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a") as fh:
            fh.write((out / "pareto.md").read_text() + "\n")


def _exit_code(result: "SweepResult", report_code: int) -> int:
    """130 interrupted; 1 when the bench pass failed or an operator could not be timed (a bug to look at,
    as in `tpool bench`); else the gates' code."""
    if result.interrupted:
        return 130
    if result.bench_failed:
        stderr.print(f"[red]error:[/red] {escape(result.bench_failed)}", highlight=False)
        return 1
    if result.bench_failures:
        return 1
    return report_code
