"""Honest speeds: the spread of a speed figure and the load of the machine it was measured on.

A throughput measured on a busy machine, or one whose repeats disagree, is not a fact about the
model. Every speed figure tpool records therefore carries:

* its **spread** over repeats, ``(max - min) / median`` of the per-repeat images/s (the bench
  pass's timed runs; for the model-only figure of an evaluation, its timed batches, over the
  inter-quartile range when there are 4 or more so that one slow batch does not flag a point);
* the **load** while it was measured (:func:`machine_load`): on CPU the 1-minute load average
  against the cores this process may use (``os.sched_getaffinity``) and the intra-op threads; on
  CUDA the number of *other* processes holding the device (``nvidia-smi``, when present);
* a **flag** (:func:`speed_flag`), the reason as text, when the spread is above
  :data:`SPREAD_LIMIT` or the machine was loaded: CPU load average above the cores in use means
  runnable threads waited for a core (our own threads count in the load average, so an idle
  machine running tpool on every core sits at about the core count, not above it).

The flag is computed when the figure is measured and stored in the row, so a resumed sweep keeps
it; reports show it in every table (``notes``) and draw flagged speeds hollow. No torch import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any, Optional, Sequence

SPREAD_LIMIT = 0.25  # repeats that differ by more than this (of the median) make a figure noisy
LOAD_MARGIN = 0.5  # load-average slack above the core count before a CPU counts as loaded


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; the CPU count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def other_gpu_processes(index: int = 0) -> Optional[int]:
    """Processes other than this one with a context on CUDA device ``index`` (None: cannot tell)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, f"--id={index}", "--query-compute-apps=pid", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    pids = {line.strip() for line in done.stdout.splitlines() if line.strip().isdigit()}
    pids.discard(str(os.getpid()))
    return len(pids)


def machine_load(device_type: str, threads: Optional[int] = None, device_index: int = 0) -> dict[str, Any]:
    """What the machine was doing at measurement time (JSON-able, stored in the row)."""
    if device_type == "cuda":
        return {"gpu_other_procs": other_gpu_processes(device_index)}
    load: dict[str, Any] = {"cores": usable_cores(), "threads": threads, "wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if hasattr(os, "getloadavg"):
        load["load1"] = round(os.getloadavg()[0], 2)
    return load


def spread(runs: Optional[Sequence[float]]) -> Optional[float]:
    """(max - min) / median of the per-repeat figures; None with fewer than 2."""
    values = sorted(float(v) for v in runs or [] if v)
    if len(values) < 2:
        return None
    median = values[len(values) // 2] if len(values) % 2 else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    return round((values[-1] - values[0]) / median, 4) if median > 0 else None


def batch_spread(timings: Sequence[tuple[int, float]], batch_size: int) -> Optional[float]:
    """Spread of per-batch images/s over the steady batches (first and partial ones left out, as
    the model-only figure does); inter-quartile over the median with 4 or more batches."""
    steady = [n / dt for i, (n, dt) in enumerate(timings) if i > 0 and n == batch_size and dt > 0]
    if len(steady) < 4:
        return spread(steady)
    steady.sort()
    q = len(steady) // 4
    return spread(steady[q: len(steady) - q])


def load_reason(load: Optional[dict[str, Any]]) -> Optional[str]:
    """Why the machine counts as loaded, or None."""
    if not isinstance(load, dict):
        return None
    others = load.get("gpu_other_procs")
    if isinstance(others, int) and others > 0:
        return f"busy: {others} other process(es) on the GPU"
    load1, cores = load.get("load1"), load.get("cores")
    if isinstance(load1, (int, float)) and isinstance(cores, int) and load1 > cores + LOAD_MARGIN:
        return f"busy: load {load1:.2f} on {cores} cores"
    return None


def speed_flag(spread_value: Optional[float], load: Optional[dict[str, Any]]) -> Optional[str]:
    """The flag of a speed figure: its reasons joined by '; ', or None when it can be trusted."""
    reasons = []
    if isinstance(spread_value, (int, float)) and spread_value > SPREAD_LIMIT:
        reasons.append(f"noisy: spread {spread_value:.0%}")
    busy = load_reason(load)
    if busy:
        reasons.append(busy)
    return "; ".join(reasons) or None


def eval_speed_fields(timings: Sequence[tuple[int, float]], row: dict[str, Any]) -> dict[str, Any]:
    """``model_only_spread`` and ``speed_flag`` of an evaluation row (its ``speed_load`` already in)."""
    value = batch_spread(timings, int(row.get("batch_size") or 0))
    return {"model_only_spread": value, "speed_flag": speed_flag(value, row.get("speed_load"))}


def bench_speed_fields(runs: Optional[Sequence[float]], device_type: str) -> dict[str, Any]:
    """``bench_spread``, ``bench_load`` and ``bench_flag`` of a bench row, measured now."""
    import torch  # only on the bench path, which has it loaded already

    load = machine_load(device_type, torch.get_num_threads() if device_type == "cpu" else None)
    value = spread(runs)
    return {"bench_spread": value, "bench_load": load, "bench_flag": speed_flag(value, load)}


def row_flag(row: dict[str, Any], bench: bool) -> Optional[str]:
    """The flag of the speed figure a report shows for ``row`` (stored, or derived for old rows)."""
    stored = row.get("bench_flag" if bench else "speed_flag")
    if isinstance(stored, str):
        return stored
    if bench:  # rows timed before flags existed: their runs still tell the spread
        return speed_flag(spread(row.get("bench_runs_img_s")), row.get("bench_load"))
    return None
