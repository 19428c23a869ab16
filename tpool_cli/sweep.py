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

import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from .data import ImageFolder, data_config, decode_once, fingerprint, scan_folder
from .errors import TpoolError
from .device import device_name, dtype_label, release_host_memory, resolve_amp, resolve_device
from .evaluate import evaluate, model_config, versions
from .lock import holds_out_lock
from .models import LoadedModel
from .output import write_text
from .ops import TokenOperator
from .patch import patch, unpatch
from .profile import build_configs
from .schedule import Schedule
from .stats import correct_record

if TYPE_CHECKING:
    from .bench import BenchSettings

RESULTS_FILE = "results.jsonl"
PLAN_FILE = "plan.json"  # the point keys of the latest sweep, in order: what `tpool report` rebuilds
DEFAULT_KEEPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
# What a result depends on; two points with equal values here are the same measurement.
KEY_FIELDS = (
    "model", "weights_id", "data_fingerprint", "op", "op_options", "keep", "tokens", "layers", "img_size",
    "dtype", "device", "prop_attn", "seed",
    # throughput depends on these too: a point timed otherwise is not reused next to fresh ones
    "device_name", "batch_size", "compile", "torch", "timm", "tpool",
)

Log = Callable[[str], None]


def _stderr_log(message: str) -> None:
    from rich.markup import escape

    from .output import stderr

    stderr.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)


@dataclass(frozen=True)
class Point:
    """One configuration of the sweep; ``operator`` None is the unpatched baseline."""

    operator: Optional[TokenOperator] = None
    schedule: Optional[Schedule] = None

    @property
    def is_baseline(self) -> bool:
        return self.operator is None

    def label(self, depth: int) -> str:
        if self.operator is None or self.schedule is None:
            return "baseline"
        return f"{self.operator.label()} {self.schedule.describe(depth)}"

    def apply(self, model: torch.nn.Module, prop_attn: bool = False, seed: int = 0) -> None:
        """Patch ``model`` for this point (or restore the plain model for the baseline)."""
        if self.operator is None:
            unpatch(model)
        else:
            patch(model, self.operator, schedule=self.schedule, prop_attn=prop_attn, seed=seed)


def plan_points(
    ops: Sequence[str],
    keeps: Optional[Sequence[float]] = DEFAULT_KEEPS,
    layers: Optional[tuple[int, ...]] = None,
    tokens: Optional[tuple[int, ...]] = None,
    **op_options: Any,
) -> list[Point]:
    """The baseline first, then every operator x schedule. Keep rate 1.0 never reduces, so it is
    the baseline itself and not evaluated again; repeated points are dropped."""
    points = [Point()]
    for operator, schedule in build_configs(ops, keeps, layers, tokens, **op_options):
        point = Point(operator, schedule)
        if not schedule.is_identity and point not in points:
            points.append(point)
    return points


def point_identity(row: dict[str, Any]) -> dict[str, Any]:
    """The fields of a (planned or finished) row that decide its numbers."""
    weights_id = row.get("weights_sha256") or row.get("weights")
    ident = {k: row.get(k) for k in KEY_FIELDS if k != "weights_id"}
    ident["weights_id"] = weights_id
    return ident


def point_key(row: dict[str, Any]) -> str:
    """Short stable hash of :func:`point_identity`."""
    text = json.dumps(point_identity(row), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class ResultsStore:
    """``results.jsonl``: append-only, one JSON object per line, safe against being killed.

    Appends are one ``os.write`` of a whole line on an ``O_APPEND`` descriptor followed by fsync,
    so a kill leaves either the complete line or, at worst, a truncated last line; :meth:`read`
    detects a truncated last line (no final newline: a line is always written whole, newline
    included), warns, and, with ``repair``, cuts it off the file so the next append starts on a
    clean line. A complete line that is not a JSON object is reported and ignored, never cut.
    """

    def __init__(self, path: Path, log: Log = _stderr_log, keep: str = "first") -> None:
        self.path = Path(path)
        self.log = log
        self.keep = keep  # which row of a repeated key counts: "first" (results) or "last" (re-timed bench rows)

    def read(self, repair: bool = True) -> list[dict[str, Any]]:
        """All complete rows, one per key (see ``keep``); ``repair=False`` never writes."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise TpoolError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        lines = data.split(b"\n")
        good_end = len(data)
        if lines and lines[-1] == b"":
            lines.pop()
        elif lines:  # no newline at the end: the last line was cut while being written
            good_end = len(data) - len(lines[-1])
            self.log(f"{self.path}: dropped a truncated last line ({len(lines[-1])} bytes); that point will be evaluated again")
            lines.pop()
        rows: list[dict[str, Any]] = []
        seen: dict[Any, int] = {}  # key -> index in rows
        for number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError:
                self.log(f"{self.path}: line {number} is not a JSON object; ignored")
                continue
            key = row.get("key")
            if key in seen:
                if self.keep == "last":
                    rows[seen[key]] = row
                else:
                    self.log(f"{self.path}: line {number} repeats point {row.get('op')} {row.get('schedule')}; ignored")
                continue
            seen[key] = len(rows)
            rows.append(row)
        if repair and good_end < len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
                fh.flush()
                os.fsync(fh.fileno())
        return rows

    def append(self, row: dict[str, Any]) -> None:
        """Write ``row`` as one line, durably, before returning."""
        line = (json.dumps(row, default=str) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(line)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:  # a full disk or a read-only folder: one clear line, the rows before it kept
            raise TpoolError(f"cannot write {self.path}: {exc.strerror or exc}") from None


def move_aside(path: Path) -> Path:
    """Rename ``path`` to ``NAME.old`` (then ``.old.2``, ...), never overwriting an earlier one."""
    aside = next(p for n in range(1, 10_000) if not (p := path.with_name(f"{path.name}.old{'' if n == 1 else f'.{n}'}")).exists())
    path.replace(aside)
    return aside


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
    prop_attn: bool = False,
    seed: int = 0,
    cache: str = "auto",
    bench: Optional["BenchSettings"] = None,
    retime: bool = False,
    progress: Optional[SweepProgress] = None,
    log: Log = _stderr_log,
) -> SweepResult:
    """Evaluate every point not yet in ``out/results.jsonl`` from one decode-once cache.

    ``resume=False`` moves an existing results file (and ``bench.jsonl``) aside
    (``results.jsonl.old``, then ``.old.2``..., never overwriting one) and starts over.
    ``cache``: where the decoded images live ('auto', 'memory', 'disk' under ``out/cache``).
    ``bench``: after the accuracy pass, time every point as ``tpool bench`` does (see
    :mod:`tpool_cli.sweep_bench`) and add those figures to the rows; ``retime``: time every point
    again, those already in ``bench.jsonl`` included (the newer figures win).
    The folder is locked for the call (:mod:`tpool_cli.lock`): a second sweep on it fails at once.
    Ctrl-C stops after recording the points finished so far (``interrupted=True``).
    """
    progress = progress or SweepProgress()
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TpoolError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
    store = ResultsStore(out / RESULTS_FILE, log)
    if not resume:
        from .sweep_bench import BENCH_FILE

        for path in (store.path, out / BENCH_FILE):  # bench figures start over with the results
            if path.exists():
                aside = move_aside(path)
                log(f"--no-resume: moved the earlier {path.name} to {aside.name}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = dtype_label(resolve_amp(amp, dev))
    folder = data if isinstance(data, ImageFolder) else scan_folder(data, class_map=class_map, limit=limit)
    net = model.model
    depth = len(net.blocks)
    cfg = data_config(net)
    fp = fingerprint(folder, cfg)

    if bench is not None:
        from .sweep_bench import bench_key

        bench = replace(bench, amp=amp, compile=compile)  # timed in the sweep's precision and mode
    planned: list[tuple[Point, str]] = []
    bench_keys: dict[str, str] = {}  # point key -> key of its bench row
    for point in points:
        point.apply(net, prop_attn=prop_attn, seed=seed)
        ident = {
            **model_config(net, model), **versions(), "data_fingerprint": fp, "dtype": dtype, "device": dev.type,
            "device_name": device_name(dev), "batch_size": batch_size, "compile": compile,
        }
        planned.append((point, point_key(ident)))
        if bench is not None:
            bench_keys[planned[-1][1]] = bench_key(ident, bench, dtype)
    unpatch(net)

    plan: dict[str, Any] = {"keys": [key for _, key in planned]}
    if bench is not None:
        plan["bench"] = bench_keys
    write_text(out / PLAN_FILE, json.dumps(plan, indent=1) + "\n")
    existing = {row["key"]: row for row in store.read() if "key" in row}
    done: dict[str, dict[str, Any]] = {key: existing[key] for _, key in planned if key in existing}
    pending = [(p, k) for p, k in planned if k not in done]
    progress.start(len(planned), len(done))
    result = SweepResult(rows=[], evaluated=0, reused=len(done), planned=len(planned), interrupted=False, out=out)

    if pending:
        try:
            t0 = time.perf_counter()
            decoded = decode_once(
                folder, cfg, batch_size=batch_size, workers=workers, cache_dir=out / "cache", storage=cache,
                progress=progress.decode(len(folder)),
            )
            decoded = decoded.to(dev)
            result.decode_seconds = time.perf_counter() - t0
            result.cache_storage = decoded.storage
            result.skipped_files = list(decoded.skipped)
            for point, key in pending:
                point.apply(net, prop_attn=prop_attn, seed=seed)
                res = evaluate(
                    model, decoded, device=dev, amp=amp, batch_size=batch_size, compile=compile,
                    progress=progress.point(point.label(depth), len(decoded) + len(decoded.skipped)), keep_predictions=True,
                )
                if res.interrupted:
                    result.interrupted = True
                    break
                row = res.row(skipped_paths=False)
                row["correct1_bits"] = correct_record(res, folder)  # per-image top-1, to pair points (stats.py)
                row.update(
                    key=key, data_fingerprint=fp, point=point.label(depth), cache=decoded.storage,
                    finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                )
                if point_key(row) != key:  # the row must describe what was planned
                    raise RuntimeError(f"point {point.label(depth)}: key of the result differs from the plan")
                store.append(row)
                done[key] = row
                result.evaluated += 1
                progress.point_done(row)
        except KeyboardInterrupt:
            result.interrupted = True
        finally:
            unpatch(net)
            decoded = None  # the bench pass must not share the device with the image cache
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            release_host_memory()  # the cache's host copy, now free, back to the OS
    result.rows = [done[key] for _, key in planned if key in done]
    if bench is not None:
        from .sweep_bench import bench_points, merge_bench, read_bench

        if not result.interrupted:
            try:
                result.benched, result.bench_failures = bench_points(
                    net, planned, bench_keys, bench, dev, out, prop_attn=prop_attn, seed=seed, progress=progress.bench,
                    start=progress.bench_start, log=log, retime=retime,
                )
            except KeyboardInterrupt:
                result.interrupted = result.bench_interrupted = True
            except TpoolError as exc:
                memory = "out of memory" in str(exc).lower() or "cannot allocate" in str(exc).lower()
                result.bench_failed = f"--bench: {exc}" + (
                    f" (at --bench-batch-size {bench.batch_size}: try a smaller one)" if memory else ""
                )
        # the very figures `tpool report` merges: whatever bench.jsonl holds for this plan
        result.rows = merge_bench(result.rows, read_bench(out, bench_keys, log))
    return result
