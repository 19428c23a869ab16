"""Throughput figures of a sweep's points from :func:`tpool_cli.bench.bench` (``tpool pareto --bench``).

The accuracy pass times the model on real images in the evaluation loop (``model_only_img_s``),
one point after the other; machine drift between points then shows up as speed differences.
:func:`bench_points` measures every point of the plan the way ``tpool bench`` does instead: one
run on a synthetic batch, warm-up, device synchronised, the variants interleaved (eager), and each
operator judged against the unpatched baseline and the *ideal* (its token counts, reduction free)
timed in the same run. The report then plots accuracy against these figures.

Rows go to ``OUT/bench.jsonl`` (the same append-only store as the results), one per point, keyed
by :func:`bench_key`: what the point's speed depends on (not the data it was evaluated on) and the
timing settings. A rerun times only the points without a good row (a row with ``bench_error``,
say a transient out-of-memory, is timed again, and the newer row wins); every row keeps the
baseline and ideal figures of its own run, so its ratios are always same-run ratios, and
``bench_run`` tells the runs apart. A row is written as soon as its figures are final: after the
last timed round in eager mode (the rounds are interleaved), after each variant when compiled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .bench import BenchReport, BenchRow, BenchSettings, Variant, bench, timing_defaults
from .device import device_name, dtype_label
from .errors import TpoolError
from .schedule import Schedule
from .store import (  # noqa: F401  (BENCH_FILE, MERGED_FIELDS, bench_key, merge_bench, read_bench: re-exported)
    BENCH_FILE, DATA_FIELDS, MERGED_FIELDS, Log, ResultsStore, bench_key, merge_bench, read_bench, warn,
)
from .sweep_plan import Point
from .speedflags import bench_speed_fields

# Runs of one point that differ by more than this (max - min over the median) get a warning.
NOISY_SPREAD = 0.25


def _final(v: Variant, repeats: int) -> bool:
    """Whether a variant's figures can no longer change: failed, or all its runs timed."""
    return v.error is not None or (v.timing is not None and len(v.timing.runs_img_per_s) >= repeats)


def bench_row(key: str, point: Point, result: BenchRow, report: BenchReport, run: str) -> dict[str, Any]:
    """One point's figures (``tpool bench``'s row of it, renamed), with the baseline and ideal of its run."""
    s = report.settings
    r = result.row(s, {})
    return {
        "key": key,
        "point": point.label(result.depth),
        "op": point.operator.label() if point.operator is not None else "none",
        "tokens_per_block": r["tokens_per_block"],
        "bench_img_s": r["op_img_s"],
        "bench_baseline_img_s": r["baseline_img_s"],
        "bench_ideal_img_s": r["ideal_img_s"],
        "bench_vs_baseline": r["op_vs_baseline"],
        "bench_vs_ideal": r["op_vs_ideal"],
        "bench_ideal_vs_baseline": r["ideal_vs_baseline"],
        "bench_runs_img_s": r["op_runs_img_s"],
        "bench_compile_s": r["op_compile_s"],
        "bench_error": r["error"],
        "bench_run": run,
        "bench_batch_size": s.batch_size,
        "bench_dtype": dtype_label(report.amp),
        "bench_compile": s.compile,
        "bench_steps": s.steps,
        "bench_repeats": s.repeats,
        "device_name": report.device_name,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **bench_speed_fields(r["op_runs_img_s"], report.device.type),
    }


def failed_baseline_row(
    key: str, point: Point, settings: BenchSettings, device: torch.device, run: str, error: str, depth: int,
) -> dict[str, Any]:
    """The baseline's row when it could not be timed at all (no figures; timed again next time)."""
    return {
        "key": key, "point": point.label(depth), "op": "none", "bench_error": error, "bench_run": run,
        "bench_batch_size": settings.batch_size, "bench_compile": settings.compile, "bench_steps": settings.steps,
        "bench_repeats": settings.repeats, "device_name": device_name(device),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _spread(runs: Optional[list[float]]) -> float:
    if not runs or len(runs) < 2:
        return 0.0
    ordered = sorted(runs)
    return (ordered[-1] - ordered[0]) / ordered[len(ordered) // 2]


def sweep_bench_settings(
    device: torch.device,
    *,
    enabled: bool,
    batch_size: int,
    img_size: Optional[int] = None,
    amp: Optional[str] = None,
    compile: bool = False,
    bench_batch_size: Optional[int] = None,
    bench_steps: Optional[int] = None,
    bench_repeats: Optional[int] = None,
) -> Optional[BenchSettings]:
    """The timing settings of a sweep's bench pass, or None without one.

    Args:
        device: where the sweep runs (the warm-up and step defaults depend on it).
        enabled: whether the sweep has a bench pass at all.
        batch_size: the sweep's evaluation batch, the synthetic batch unless ``bench_batch_size``.
        img_size, amp, compile: the sweep's own, so the points are timed as they were evaluated.
        bench_batch_size, bench_steps, bench_repeats: overrides; an error without a bench pass.
    """
    if not enabled:
        given = [name for name, value in (("--bench-batch-size", bench_batch_size), ("--bench-steps", bench_steps),
                                          ("--bench-repeats", bench_repeats)) if value is not None]
        if given:
            raise TpoolError(f"{', '.join(given)} {'goes' if len(given) == 1 else 'go'} with --bench")
        return None
    _, warmup, steps = timing_defaults(device)
    return BenchSettings(
        batch_size=bench_batch_size or batch_size, img_size=img_size, amp=amp, compile=compile,
        warmup=warmup, steps=bench_steps or steps, repeats=bench_repeats or 3,
    )


@dataclass
class _RowWriter:
    """Appends each point's bench row once its figures are final (state of one :func:`bench_points` call)."""

    store: ResultsStore
    keys: dict[str, str]  # point key -> bench key
    ops: list[tuple[Point, str]]  # the operator points being timed, in bench() row order
    baselines: list[tuple[Point, str]]  # the baseline point(s) without a good row
    repeats: int
    run: str
    depth: int
    log: Log
    advance: Callable[[int], None]
    written: set[str] = field(default_factory=set)
    noisy: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def write(self, point: Point, point_key: str, r: Optional[BenchRow], report: BenchReport) -> None:
        b = report.baseline  # the baseline point: its own ideal and operator
        r = r or BenchRow("none", Schedule(keep=1.0), self.depth, b, b, b)
        row = bench_row(self.keys[point_key], point, r, report, self.run)
        self.store.append(row)
        self.written.add(point_key)
        if row["bench_error"]:
            self.failed.append(row["point"])
            self.log(f"--bench: {row['point']} could not be timed: {row['bench_error']}")
        if _spread(row["bench_runs_img_s"]) > NOISY_SPREAD:
            self.noisy.append(row["point"])

    def flush(self, report: BenchReport) -> None:
        """Append every row whose figures (its own, its ideal's and the baseline's) are final."""
        self.advance(1)  # bench() calls this after the baseline, after each point and after each timed round
        if not _final(report.baseline, self.repeats):
            return
        for point, point_key in self.baselines:
            if point_key not in self.written:
                self.write(point, point_key, None, report)
        for (point, point_key), r in zip(self.ops, report.rows):
            if point_key not in self.written and _final(r.operator, self.repeats) and _final(r.ideal, self.repeats):
                self.write(point, point_key, r, report)


def bench_points(
    model: torch.nn.Module,
    planned: Sequence[tuple[Point, str]],
    keys: dict[str, str],
    settings: BenchSettings,
    device: torch.device,
    out: Path,
    *,
    prop_attn: Optional[bool] = None,
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
    start: Optional[Callable[[int], Callable[[int], None]]] = None,
    log: Log = warn,
    retime: bool = False,
) -> tuple[int, int]:
    """Time the planned (point, point key) pairs that have no good row in ``out/bench.jsonl``.

    ``keys`` maps each point key to its :func:`bench_key`. The missing points are timed in one
    :func:`tpool_cli.bench.bench` run (the baseline always with them, for the ratios) and each
    row appended as soon as it is final. An operator that fails while timed gets a row with
    ``bench_error`` (timed again by the next call); a baseline that cannot run raises
    :class:`tpool_cli.errors.TpoolError` (after writing what it could). ``start(total)`` is called
    once with the number of updates to come (baseline, each point, each timed round in eager mode)
    and returns the callback that advances a progress bar by them. ``retime`` times every planned
    point again, good rows included (``tpool pareto --retime``). Returns (points timed, of which
    failed).
    """
    store = ResultsStore(Path(out) / BENCH_FILE, log, keep="last")
    good = {row["key"] for row in store.read() if "key" in row and not row.get("bench_error")}
    if retime:  # `--retime`: every planned point is timed again; the newer row wins (keep="last")
        good = set()
    missing = [(p, k) for p, k in planned if keys[k] not in good]
    if not missing:
        return 0, 0
    ops = [(p, k) for p, k in missing if not p.is_baseline]
    total = 1 + len(ops) + (0 if settings.compile else settings.repeats)
    writer = _RowWriter(
        store, keys, ops, [(p, k) for p, k in missing if p.is_baseline], settings.repeats,
        run=time.strftime("%Y%m%dT%H%M%S"), depth=len(model.blocks), log=log,  # type: ignore[arg-type]
        advance=start(total) if start else (lambda n: None),
    )
    try:
        report = bench(
            model, [(p.operator, p.schedule) for p, _ in ops], settings, device, prop_attn=prop_attn, seed=seed,
            errors="record", count_gmacs=False, progress=progress, on_update=writer.flush,
        )
    except TpoolError as exc:  # the baseline does not run: say so in the report too, then let the caller decide
        for point, point_key in writer.baselines:  # a good row of an earlier run stays the one that counts
            store.append(failed_baseline_row(keys[point_key], point, settings, device, writer.run, str(exc), writer.depth))
        raise
    writer.advance(-1)  # the closing flush below is not one of bench()'s updates
    writer.flush(report)
    if writer.noisy:
        log(f"--bench: {len(writer.noisy)} point(s) varied by more than {NOISY_SPREAD:.0%} between runs (a busy machine?), "
            f"e.g. {writer.noisy[0]}; see bench_runs_img_s in {store.path}")
    if report.baseline.error:  # it ran its first calls, then failed in a timed round
        raise TpoolError(f"the unpatched model failed while timed: {report.baseline.error}")
    return len(writer.written), len(writer.failed)
