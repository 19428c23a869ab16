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

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .bench import BenchReport, BenchRow, BenchSettings, Variant, bench
from .device import device_name, dtype_label
from .errors import TpoolError
from .schedule import Schedule
from .speedflags import bench_speed_fields
from .sweep import Log, Point, ResultsStore, point_identity

BENCH_FILE = "bench.jsonl"
# Point-key fields a timing on a synthetic batch does not depend on.
DATA_FIELDS = ("data_fingerprint", "batch_size")
# Runs of one point that differ by more than this (max - min over the median) get a warning.
NOISY_SPREAD = 0.25
# What a point row gains from its bench row (the report's speed figures when present).
MERGED_FIELDS = (
    "bench_img_s", "bench_baseline_img_s", "bench_ideal_img_s", "bench_vs_baseline", "bench_vs_ideal",
    "bench_ideal_vs_baseline", "bench_compile_s", "bench_error", "bench_run", "bench_batch_size", "bench_dtype",
    "bench_compile", "bench_steps", "bench_repeats",
) + ("bench_runs_img_s", "bench_spread", "bench_load", "bench_flag")  # speedflags.py: spread, load, flag


def bench_key(ident: dict[str, Any], settings: BenchSettings, dtype: str) -> str:
    """Key of a point's bench row, from the point's identity (``sweep.point_identity``-style dict).

    The point's fields minus the data it was evaluated on (:data:`DATA_FIELDS`: another ``--limit``
    or evaluation batch size does not change a synthetic-batch timing), plus the timing settings
    with the resolved precision (``dtype``: 'fp32', 'bf16'...).
    """
    timing = asdict(settings)
    timing.pop("img_size", None)  # the point already has the resolution
    timing["amp"] = dtype
    point = {k: v for k, v in point_identity(ident).items() if k not in DATA_FIELDS}
    text = json.dumps({"point": point, "timing": timing}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


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


def bench_points(
    model: torch.nn.Module,
    planned: Sequence[tuple[Point, str]],
    keys: dict[str, str],
    settings: BenchSettings,
    device: torch.device,
    out: Path,
    *,
    prop_attn: bool = False,
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
    start: Optional[Callable[[int], Callable[[int], None]]] = None,
    log: Log = print,
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
    baseline_missing = [(p, k) for p, k in missing if p.is_baseline]
    run = time.strftime("%Y%m%dT%H%M%S")
    depth = len(model.blocks)  # type: ignore[arg-type]
    written: set[str] = set()
    noisy: list[str] = []
    failed: list[str] = []

    def write(point: Point, point_key: str, r: BenchRow | None, report: BenchReport) -> None:
        b = report.baseline  # the baseline point: its own ideal and operator
        r = r or BenchRow("none", Schedule(keep=1.0), depth, b, b, b)
        row = bench_row(keys[point_key], point, r, report, run)
        store.append(row)
        written.add(point_key)
        if row["bench_error"]:
            failed.append(row["point"])
            log(f"--bench: {row['point']} could not be timed: {row['bench_error']}")
        if _spread(row["bench_runs_img_s"]) > NOISY_SPREAD:
            noisy.append(row["point"])

    advance = start(1 + len(ops) + (0 if settings.compile else settings.repeats)) if start else (lambda n: None)

    def flush(report: BenchReport) -> None:
        """Append every row whose figures (its own, its ideal's and the baseline's) are final."""
        advance(1)  # bench() calls this after the baseline, after each point and after each timed round
        if not _final(report.baseline, settings.repeats):
            return
        for point, point_key in baseline_missing:
            if point_key not in written:
                write(point, point_key, None, report)
        for (point, point_key), r in zip(ops, report.rows):
            if point_key not in written and _final(r.operator, settings.repeats) and _final(r.ideal, settings.repeats):
                write(point, point_key, r, report)

    try:
        report = bench(
            model, [(p.operator, p.schedule) for p, _ in ops], settings, device, prop_attn=prop_attn, seed=seed,
            errors="record", count_gmacs=False, progress=progress, on_update=flush,
        )
    except TpoolError as exc:  # the baseline does not run: say so in the report too, then let the caller decide
        for point, point_key in baseline_missing:  # a good row of an earlier run stays the one that counts
            store.append(failed_baseline_row(keys[point_key], point, settings, device, run, str(exc), depth))
        raise
    advance(-1)  # the closing flush below is not one of bench()'s updates
    flush(report)
    if noisy:
        log(f"--bench: {len(noisy)} point(s) varied by more than {NOISY_SPREAD:.0%} between runs (a busy machine?), "
            f"e.g. {noisy[0]}; see bench_runs_img_s in {store.path}")
    if report.baseline.error:  # it ran its first calls, then failed in a timed round
        raise TpoolError(f"the unpatched model failed while timed: {report.baseline.error}")
    return len(written), len(failed)


def merge_bench(rows: list[dict[str, Any]], bench_rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Point rows with their bench figures (``MERGED_FIELDS``) added; rows without one are left as they are."""
    merged = []
    for row in rows:
        extra = bench_rows.get(row.get("key", ""))
        merged.append({**row, **{f: extra.get(f) for f in MERGED_FIELDS}} if extra else row)
    return merged


def read_bench(out: Path, wanted: dict[str, str], log: Optional[Log] = None) -> dict[str, dict[str, Any]]:
    """{point key: bench row} for ``wanted`` ({point key: bench key}, from plan.json), read only.

    The newest row of a key wins (a point timed again after an error)."""
    path = Path(out) / BENCH_FILE
    if not wanted or not path.is_file():
        return {}
    store = ResultsStore(path, log, keep="last") if log else ResultsStore(path, keep="last")
    by_key = {row.get("key"): row for row in store.read(repair=False)}
    return {point_key: by_key[key] for point_key, key in wanted.items() if key in by_key}
