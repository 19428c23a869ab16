"""Throughput figures of a sweep's points from :func:`tpool_cli.bench.bench` (``tpool pareto --bench``).

The accuracy pass times the model on real images in the evaluation loop (``model_only_img_s``),
one point after the other; machine drift between points then shows up as speed differences.
:func:`bench_points` measures every point of the plan the way ``tpool bench`` does instead: one
run on a synthetic batch, warm-up, device synchronised, the variants interleaved (eager), and each
operator judged against the unpatched baseline and the *ideal* (its token counts, reduction free)
timed in the same run. The report then plots accuracy against these figures.

Rows go to ``OUT/bench.jsonl`` (the same append-only store as the results), one per point, keyed
by the point's key and the timing settings. A rerun times only the points without a row; every
row keeps the baseline and ideal figures of its own run, so its ratios are always same-run ratios,
and ``bench_run`` tells the runs apart. Rows are written when a run ends (the timed rounds are
interleaved, so no figure is final before): an interrupted bench pass is redone, and costs no
accuracy point.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .bench import BenchReport, BenchSettings, Variant, bench
from .device import dtype_label
from .sweep import Log, Point, ResultsStore

BENCH_FILE = "bench.jsonl"
# What a point row gains from its bench row (the report's speed figures when present).
MERGED_FIELDS = (
    "bench_img_s", "bench_baseline_img_s", "bench_ideal_img_s", "bench_vs_baseline", "bench_vs_ideal",
    "bench_ideal_vs_baseline", "bench_compile_s", "bench_error", "bench_run", "bench_batch_size", "bench_dtype",
    "bench_compile", "bench_steps", "bench_repeats",
)


def timing_id(settings: BenchSettings) -> dict[str, Any]:
    """The timing settings a bench figure depends on (beyond the point itself)."""
    fields = asdict(settings)
    fields.pop("img_size", None)  # the point's key already has the resolution
    return fields


def bench_key(point_key: str, settings: BenchSettings) -> str:
    """Key of a point's bench row: the point (model, weights, operator, schedule, device...) and the timing."""
    text = json.dumps({"point": point_key, "timing": timing_id(settings)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _rate(v: Variant) -> Optional[float]:
    return v.timing.img_per_s if v.timing else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 4) if a is not None and b else None


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 3)


def bench_row(
    key: str, point_key: str, point: Point, variant: Variant, baseline: Variant, ideal: Variant,
    report: BenchReport, run: str, depth: int,
) -> dict[str, Any]:
    """One point's figures, with the baseline and ideal of the run they were measured in."""
    s = report.settings
    rate, base, ideal_rate = _rate(variant), _rate(baseline), _rate(ideal)
    return {
        "key": key,
        "point_key": point_key,
        "point": point.label(depth),
        "op": point.operator.label() if point.operator is not None else "none",
        "tokens_per_block": variant.tokens_per_block,
        "bench_img_s": _round(rate),
        "bench_baseline_img_s": _round(base),
        "bench_ideal_img_s": _round(ideal_rate),
        "bench_vs_baseline": _ratio(rate, base),
        "bench_vs_ideal": _ratio(rate, ideal_rate),
        "bench_ideal_vs_baseline": _ratio(ideal_rate, base),
        "bench_runs_img_s": [round(r, 3) for r in variant.timing.runs_img_per_s] if variant.timing else None,
        "bench_compile_s": round(variant.timing.first_call_s, 3) if s.compile and variant.timing else None,
        "bench_error": variant.error or ideal.error or baseline.error,
        "bench_run": run,
        "bench_batch_size": s.batch_size,
        "bench_dtype": dtype_label(report.amp),
        "bench_compile": s.compile,
        "bench_steps": s.steps,
        "bench_repeats": s.repeats,
        "device_name": report.device_name,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def bench_points(
    model: torch.nn.Module,
    planned: Sequence[tuple[Point, str]],
    settings: BenchSettings,
    device: torch.device,
    out: Path,
    *,
    prop_attn: bool = False,
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
    log: Optional[Log] = None,
) -> tuple[dict[str, dict[str, Any]], int]:
    """Bench rows of the planned (point, point key) pairs, timing only those not in ``out/bench.jsonl``.

    Returns ({point key: bench row}, number of points timed by this call). The missing points are
    timed in one :func:`tpool_cli.bench.bench` run (the baseline always with them, for the ratios)
    and their rows appended. An operator that fails while timed gets a row with ``bench_error``.
    """
    store = ResultsStore(Path(out) / BENCH_FILE, log) if log else ResultsStore(Path(out) / BENCH_FILE)
    keys = {point_key: bench_key(point_key, settings) for _, point_key in planned}
    existing = {row["key"]: row for row in store.read() if "key" in row}
    missing = [(p, k) for p, k in planned if keys[k] not in existing]
    if missing:
        ops = [(p, k) for p, k in missing if not p.is_baseline]
        configs = [(p.operator, p.schedule) for p, _ in ops]
        report = bench(model, configs, settings, device, prop_attn=prop_attn, seed=seed, errors="record",
                       count_gmacs=False, progress=progress)
        run = time.strftime("%Y%m%dT%H%M%S")
        depth = len(model.blocks)  # type: ignore[arg-type]
        b = report.baseline
        for point, point_key in missing:
            if point.is_baseline:
                row = bench_row(keys[point_key], point_key, point, b, b, b, report, run, depth)
                store.append(row)
                existing[row["key"]] = row
        for (point, point_key), bench_result in zip(ops, report.rows):
            r = bench_result
            row = bench_row(keys[point_key], point_key, point, r.operator, r.baseline, r.ideal, report, run, depth)
            store.append(row)
            existing[row["key"]] = row
    found = {point_key: existing[keys[point_key]] for _, point_key in planned if keys[point_key] in existing}
    return found, len(missing)


def merge_bench(rows: list[dict[str, Any]], bench_rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Point rows with their bench figures (``MERGED_FIELDS``) added; rows without one are left as they are."""
    merged = []
    for row in rows:
        extra = bench_rows.get(row.get("key", ""))
        merged.append({**row, **{f: extra.get(f) for f in MERGED_FIELDS}} if extra else row)
    return merged


def read_bench(out: Path, wanted: dict[str, str], log: Optional[Log] = None) -> dict[str, dict[str, Any]]:
    """{point key: bench row} for ``wanted`` ({point key: bench key}, from plan.json), read only."""
    path = Path(out) / BENCH_FILE
    if not wanted or not path.is_file():
        return {}
    store = ResultsStore(path, log) if log else ResultsStore(path)
    by_key = {row.get("key"): row for row in store.read(repair=False)}
    return {point_key: by_key[key] for point_key, key in wanted.items() if key in by_key}
