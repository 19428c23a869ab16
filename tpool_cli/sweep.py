"""`tpool pareto` as a library: a grid of (operator, keep) points, decoded once, resumable.

A sweep evaluates every point with :func:`tpool_cli.evaluate.evaluate` from one decode-once cache
(:func:`tpool_cli.data.decode_once`, moved onto the device when it fits), so images are read and
decoded once per sweep, not once per point. Each finished point is appended at once to
``OUT/results.jsonl`` (:class:`ResultsStore`: one JSON line written with a single ``write`` on an
``O_APPEND`` descriptor, then fsync), keyed by everything its numbers depend on
(:func:`point_identity`). A rerun skips the points whose key is already there, so a sweep killed at
any moment loses at most the point in flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .bench import BenchSettings
from .data import DecodedImages, ImageFolder, data_config, decode_once, fingerprint, scan_folder
from .distributed import from_main, gather_skipped, global_progress, is_main, shard
from .device import device_name, dtype_label, release_host_memory, resolve_amp, resolve_device
from .errors import TpoolError
from .evaluate import evaluate, model_config, versions
from .lock import holds_out_lock
from .models import LoadedModel
from .stats import correct_record
from .store import (  # noqa: F401  (KEY_FIELDS, PLAN_FILE, point_identity: re-exported for callers of the sweep)
    BENCH_FILE, KEY_FIELDS, PLAN_FILE, RESULTS_FILE, Log, ResultsStore, move_aside, point_identity, point_key, warn,
    write_plan,
)
from .sweep_bench import bench_key, bench_points, merge_bench, read_bench
from .sweep_plan import DEFAULT_KEEPS, Point, plan_points  # noqa: F401  (re-exported)
from .sweep_finetune import FINETUNE_DIR, check_train, finetune_identity, finetuned_model
from .patch import unpatch


class SweepProgress:
    """Callbacks a sweep reports through; the default does nothing (the CLI draws Rich bars)."""

    def start(self, total_points: int, done_points: int) -> None: ...

    def decode(self, total_files: int) -> Callable[[int], None]:
        return lambda n: None

    def point(self, label: str, total_images: int) -> Callable[[int], None]:
        return lambda n: None

    def point_done(self, row: dict[str, Any]) -> None: ...

    def bench_start(self, total_steps: int) -> Callable[[int], None]:
        """The bench pass begins: ``total_steps`` updates (baseline, each point, each timed round) to come."""
        return lambda n: None

    def bench(self, message: str) -> None:
        """A step of the bench pass (``run_sweep(bench=...)``): what is being timed."""


@dataclass
class SweepResult:
    """What a sweep left in ``results.jsonl`` for this configuration, in plan order."""

    rows: list[dict[str, Any]]
    evaluated: int  # points evaluated by this call
    reused: int  # points found in results.jsonl
    planned: int
    interrupted: bool
    out: Path
    decode_seconds: float = 0.0
    cache_storage: Optional[str] = None
    skipped_files: list[dict[str, str]] = field(default_factory=list)
    benched: int = 0  # points timed by this call's bench pass (0 without one, or when all were in bench.jsonl)
    bench_interrupted: bool = False  # Ctrl-C came during the bench pass (every accuracy point is kept)
    bench_failures: int = 0  # points of this call's bench pass that could not be timed (bench_error)
    bench_failed: Optional[str] = None  # why the bench pass could not time the baseline


@dataclass(frozen=True)
class _Run:
    """What every point of one sweep shares: where, how, and the model and data it runs on."""

    model: LoadedModel
    folder: ImageFolder
    out: Path
    device: torch.device
    amp: Optional[str]
    batch_size: int
    workers: Optional[int]
    compile: bool
    prop_attn: bool
    seed: int
    cache: str
    fingerprint: str
    train: Optional[ImageFolder] = None  # what fine-tuned points train on (--finetune-epochs)
    train_fingerprint: Optional[str] = None

    @property
    def depth(self) -> int:
        return len(self.model.model.blocks)


@holds_out_lock  # one sweep per folder (see lock.py)
def run_sweep(
    model: LoadedModel,
    data: str | Path | ImageFolder,
    points: Sequence[Point],
    out: str | Path,
    *,
    class_map: Optional[str | Path] = None,
    limit: Optional[int] = None,
    device: str | torch.device = "auto",
    amp: Optional[str] = None,
    batch_size: int = 64,
    workers: Optional[int] = None,
    resume: bool = True,
    compile: bool = False,
    prop_attn: Optional[bool] = None,
    seed: int = 0,
    cache: str = "auto",
    bench: Optional[BenchSettings] = None,
    retime: bool = False,
    train: Optional[str | Path | ImageFolder] = None,
    progress: Optional[SweepProgress] = None,
    log: Log = warn,
) -> SweepResult:
    """Evaluate every point not yet in ``out/results.jsonl`` from one decode-once cache.

    Three steps: plan (every point's key, written to ``plan.json``), the accuracy pass over the
    points not yet in ``results.jsonl``, then (with ``bench``) the bench pass. Ctrl-C stops after
    recording the points finished so far (``interrupted=True``).

    Args:
        model: the loaded model; patched per point, left unpatched.
        data: an image folder (path, scanned with ``class_map``/``limit``) or a scanned :class:`ImageFolder`.
        points: what to evaluate (:func:`tpool_cli.sweep_plan.plan_points`), baseline first.
        out: the sweep folder (``results.jsonl``, ``plan.json``, ``bench.jsonl``, ``cache/``).
        device, amp, batch_size, workers, compile: how to evaluate (as :func:`tpool_cli.evaluate.evaluate`).
        resume: False moves an existing results file (and ``bench.jsonl``) aside (``results.jsonl.old``,
            then ``.old.2``..., never overwriting one) and starts over.
        prop_attn, seed: how each point is patched.
        cache: where the decoded images live ('auto', 'memory', 'disk' under ``out/cache``).
        bench: after the accuracy pass, time every point as ``tpool bench`` does (see
            :mod:`tpool_cli.sweep_bench`) and add those figures to the rows.
        retime: time every point again, those already in ``bench.jsonl`` included (the newer figures win).
        train: the train folder of the fine-tuned points (``Point.finetune``; same label space as
            ``data``, scanned with ``class_map``), each fine-tuned into ``out/finetune/<point key>/``.
        progress: callbacks for progress bars (:class:`SweepProgress`).
        log: where warnings go (default: the ``tpool_cli`` logger).

    The folder is locked for the call (:mod:`tpool_cli.lock`): a second sweep on it fails at once.
    """
    progress = progress or SweepProgress()
    run = _prepare(model, data, out, class_map, limit, device, amp, batch_size, workers, compile, prop_attn, seed, cache)
    run = _with_train(run, train, class_map, points)
    store = ResultsStore(run.out / RESULTS_FILE, log)
    if not resume and is_main():  # under torchrun rank 0 alone touches the files of OUT
        _start_over(store.path, run.out / BENCH_FILE, log)
    if bench is not None:
        bench = replace(bench, amp=amp, compile=compile)  # timed in the sweep's precision and mode
    planned, bench_keys = _plan(run, points, bench)
    if is_main():  # under torchrun rank 0 alone writes the files of OUT
        write_plan(run.out, [key for _, key in planned], bench_keys if bench is not None else None)
    existing = from_main(lambda: {row["key"]: row for row in store.read() if "key" in row})  # the same on every rank
    done: dict[str, dict[str, Any]] = {key: existing[key] for _, key in planned if key in existing}
    progress.start(len(planned), len(done))
    result = SweepResult(rows=[], evaluated=0, reused=len(done), planned=len(planned), interrupted=False, out=run.out)
    pending = [(p, k) for p, k in planned if k not in done]
    if pending:
        _accuracy_pass(run, pending, store, done, result, progress)
    result.rows = [done[key] for _, key in planned if key in done]
    if bench is not None:
        if not result.interrupted:
            _bench_pass(run, planned, bench_keys, bench, result, progress, log, retime)
        # the very figures `tpool report` merges: whatever bench.jsonl holds for this plan
        result.rows = merge_bench(result.rows, read_bench(run.out, bench_keys, log))
    return result


def _prepare(
    model: LoadedModel, data: str | Path | ImageFolder, out: str | Path, class_map: Optional[str | Path],
    limit: Optional[int], device: str | torch.device, amp: Optional[str], batch_size: int, workers: Optional[int],
    compile: bool, prop_attn: bool, seed: int, cache: str,
) -> _Run:
    """The output folder created, the device and data resolved, the data fingerprinted."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TpoolError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    folder = data if isinstance(data, ImageFolder) else scan_folder(data, class_map=class_map, limit=limit)
    fp = fingerprint(folder, data_config(model.model))
    return _Run(model, folder, out, dev, amp, batch_size, workers, compile, prop_attn, seed, cache, fp)


def _with_train(run: _Run, train: Optional[str | Path | ImageFolder], class_map: Optional[str | Path],
                points: Sequence[Point]) -> _Run:
    """The run with its train folder scanned, checked against the data and fingerprinted (fine-tuned points)."""
    if train is None or not any(p.finetune is not None for p in points):
        check_train(None, run.folder, points)
        return run
    folder = train if isinstance(train, ImageFolder) else scan_folder(train, class_map=class_map)
    check_train(folder, run.folder, points)
    return replace(run, train=folder, train_fingerprint=fingerprint(folder, data_config(run.model.model)))


def _start_over(results: Path, bench: Path, log: Log) -> None:
    """Move the earlier results and bench figures aside (bench figures start over with the results)."""
    for path in (results, bench):
        if path.exists():
            aside = move_aside(path)
            log(f"--no-resume: moved the earlier {path.name} to {aside.name}")


def _plan(
    run: _Run, points: Sequence[Point], bench: Optional[BenchSettings]
) -> tuple[list[tuple[Point, str]], dict[str, str]]:
    """(point, point key) in plan order, and {point key: bench key} when there is a bench pass.

    Each point is patched in to read its configuration off the model, exactly as its row will."""
    net = run.model.model
    dtype = dtype_label(resolve_amp(run.amp, run.device))
    planned: list[tuple[Point, str]] = []
    bench_keys: dict[str, str] = {}
    for point in points:
        point.apply(net, prop_attn=run.prop_attn, seed=run.seed)
        ident = {
            **model_config(net, run.model), **versions(), "data_fingerprint": run.fingerprint, "dtype": dtype,
            "device": run.device.type, "device_name": device_name(run.device), "batch_size": run.batch_size,
            "compile": run.compile,
            **({"finetune": finetune_identity(point.finetune, run.train_fingerprint)} if point.finetune else {}),
        }
        planned.append((point, point_key(ident)))
        if bench is not None:
            bench_keys[planned[-1][1]] = bench_key(ident, bench, dtype)
    unpatch(net)
    return planned, bench_keys


def _accuracy_pass(
    run: _Run, pending: Sequence[tuple[Point, str]], store: ResultsStore, done: dict[str, dict[str, Any]],
    result: SweepResult, progress: SweepProgress,
) -> None:
    """Decode once, evaluate each pending point, append its row at once; the cache freed at the end."""
    net = run.model.model
    decoded: Optional[DecodedImages] = None
    try:
        t0 = time.perf_counter()
        decoded = decode_once(  # under torchrun each rank decodes (and caches) only its share
            shard(run.folder), data_config(net), batch_size=run.batch_size, workers=run.workers,
            cache_dir=run.out / "cache", storage=run.cache, progress=global_progress(progress.decode(len(run.folder))),
        ).to(run.device)
        result.decode_seconds = time.perf_counter() - t0
        result.cache_storage = decoded.storage
        result.skipped_files = gather_skipped(decoded.skipped, decoded.folder.shard)
        for point, key in pending:
            row = _evaluate_point(run, point, key, decoded, progress)
            if row is None:
                result.interrupted = True
                break
            if is_main():
                store.append(row)
            done[key] = row
            result.evaluated += 1
            progress.point_done(row)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        unpatch(net)
        decoded = None  # the bench pass must not share the device with the image cache
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
        release_host_memory()  # the cache's host copy, now free, back to the OS


def _evaluate_point(
    run: _Run, point: Point, key: str, decoded: DecodedImages, progress: SweepProgress
) -> Optional[dict[str, Any]]:
    """One point's result row (None when interrupted), checked against its planned key.

    A fine-tuned point is first fine-tuned (:func:`tpool_cli.sweep_finetune.finetuned_model`), then
    its fine-tuned copy is evaluated on the same decoded images."""
    label = point.label(run.depth)
    loaded, record = _point_model(run, point, key, progress, label)
    res = evaluate(
        loaded, decoded, device=run.device, amp=run.amp, batch_size=run.batch_size, compile=run.compile,
        progress=global_progress(progress.point(label, len(run.folder))),  # under torchrun: every rank's images
        keep_predictions=True,
    )
    if res.interrupted:
        return None
    row = res.row(skipped_paths=False)
    row["correct1_bits"] = correct_record(res, run.folder)  # per-image top-1, to pair points (stats.py)
    if point.finetune is not None:
        row["finetune"] = {**finetune_identity(point.finetune, run.train_fingerprint), **record}
    row.update(
        key=key, data_fingerprint=run.fingerprint, point=label, cache=decoded.storage,
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    if point_key(row) != key:  # the row must describe what was planned
        raise RuntimeError(f"point {label}: key of the result differs from the plan")
    return row


def _point_model(
    run: _Run, point: Point, key: str, progress: SweepProgress, label: str
) -> tuple[LoadedModel, dict[str, Any]]:
    """The model a point is evaluated with: the sweep's, patched; or a fine-tuned copy of it (and its record)."""
    if point.finetune is None:
        point.apply(run.model.model, prop_attn=run.prop_attn, seed=run.seed)
        return run.model, {}
    assert run.train is not None
    total = point.finetune.epochs * len(run.train)
    if point.finetune.max_steps is not None:
        total = min(total, point.finetune.max_steps * point.finetune.batch_size)
    advance = progress.point(f"fine-tune {label}", total) if is_main() else (lambda n: None)
    return finetuned_model(
        run.model, point, run.train, run.out / FINETUNE_DIR / key, device=run.device, amp=run.amp,
        prop_attn=run.prop_attn, seed=run.seed, workers=run.workers, advance=advance,
    )


def _bench_pass(
    run: _Run, planned: Sequence[tuple[Point, str]], bench_keys: dict[str, str], bench: BenchSettings,
    result: SweepResult, progress: SweepProgress, log: Log, retime: bool = False,
) -> None:
    """Time the points (:func:`tpool_cli.sweep_bench.bench_points`); failures and Ctrl-C go into ``result``."""
    try:
        result.benched, result.bench_failures = bench_points(
            run.model.model, planned, bench_keys, bench, run.device, run.out, prop_attn=run.prop_attn,
            seed=run.seed, progress=progress.bench, start=progress.bench_start, log=log, retime=retime,
        )
    except KeyboardInterrupt:
        result.interrupted = result.bench_interrupted = True
    except TpoolError as exc:
        memory = "out of memory" in str(exc).lower() or "cannot allocate" in str(exc).lower()
        result.bench_failed = f"--bench: {exc}" + (
            f" (at --bench-batch-size {bench.batch_size}: try a smaller one)" if memory else ""
        )
