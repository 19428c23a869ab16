"""Many processes, one answer: `evaluate`, `pareto` and `recon` under ``torchrun``.

``torchrun`` (or ``srun torchrun``) starts one process per device and sets ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK``. With ``WORLD_SIZE`` > 1 the library

* puts each rank on its own device (:func:`local_device`: ``cuda:LOCAL_RANK``),
* joins the process group lazily, after every check of the user's input has passed on every rank
  (:func:`ensure_group`: NCCL on CUDA, gloo on the CPU, collectives bounded by
  ``TPOOL_DIST_TIMEOUT`` seconds), so bad input is one clear line and an exit code, not a hang,
* shards the sorted image list exactly (:func:`shard`: rank r takes images r, r + W, r + 2W, ...;
  every image on exactly one rank, no padding, a rank may get none),
* sums the integer counts of each point over the ranks (:func:`combine_eval`) and gathers any
  per-image record in the global image order, so top-1, top-5, per-class and skipped-file counts
  are exactly the single-process numbers,
* lets rank 0 alone touch the results folder (:func:`is_main`, :func:`from_main`) and draw the
  one progress bar, fed with the global count through the rendezvous store
  (:func:`global_progress`).

Other ranks print nothing but their own errors (:func:`prepare_process`, :func:`error_line`).
Nothing here imports torch at module level: the CLI calls :func:`prepare_process` and
:func:`error_line` for every command, ``tpool report`` included.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from .errors import TpoolError

if TYPE_CHECKING:
    import torch

    from .data import ImageFolder

    EvalResult = Any  # tpool_cli.evaluate.EvalResult (not imported: evaluate imports this module)

DEFAULT_TIMEOUT_S = 600.0  # a collective that waits longer than this fails the job (TPOOL_DIST_TIMEOUT)
INPUT_ERROR_WAIT_S = 30.0  # a rank other than 0 with an input error waits this long for rank 0 to report it
PROGRESS_INTERVAL_S = 0.1  # ranks other than 0 add their progress to the store at most this often

Shard = Optional[tuple[int, int]]  # (rank, world size) of a folder that is one rank's share


class ReplicatedError(TpoolError):
    """An error every rank raises alike (agreed through a collective): rank 0 alone reports it."""


class Stopped(ReplicatedError):
    """torchrun ended this rank because another one failed."""


@dataclass(frozen=True)
class World:
    """Where this process stands in a torchrun job (size 1 without one)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0


def world() -> World:
    """This process's rank, world size and local rank, from torchrun's environment variables."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        return World()
    return World(rank, size, local) if size > 1 else World()


def launched() -> bool:
    """Whether this process is one of several (WORLD_SIZE > 1)."""
    return world().size > 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and prints."""
    return world().rank == 0


def timeout_s() -> float:
    """Seconds a collective may wait for the other ranks (``TPOOL_DIST_TIMEOUT``, default 600)."""
    try:
        return max(1.0, float(os.environ.get("TPOOL_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_TIMEOUT_S


class _State:
    device_type = "cpu"  # set by local_device(): the backend follows it
    group = False  # this module joined the process group
    failing = False  # an error is being reported: a SIGTERM now only ends the process
    seq = itertools.count()  # progress keys, the same sequence on every rank
    live: list["_GlobalProgress"] = []


# ---------------------------------------------------------------------------------------------
# The process: quiet ranks, errors, SIGTERM


def _on_sigterm(signum: int, frame: Any) -> None:
    if _State.failing:
        raise SystemExit(2)
    _State.failing = True
    raise Stopped("distributed: stopped by torchrun because another rank failed (its error is above; "
                  "torchrun's summary names the rank)")


def prepare_process() -> bool:
    """Under torchrun: ranks other than 0 print nothing but errors; SIGTERM becomes one clear line.

    Called once by the CLI before any command runs (cheap: reads the environment only). Returns
    whether this rank must stay quiet: the CLI then silences its consoles (the library never
    touches them); warnings and plain stdout are silenced here.
    """
    w = world()
    if w.size <= 1:
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)
    if w.rank == 0:
        return False
    import warnings

    warnings.simplefilter("ignore")
    sys.stdout = open(os.devnull, "w")
    return True


def error_line(exc: TpoolError) -> Optional[str]:
    """The line this rank prints for ``exc``, or None when another rank says it.

    Rank 0 prints every error. Another rank prints (prefixed ``rank R:``) an error of its own once
    the group exists; an error agreed through a collective (:class:`ReplicatedError`) is rank 0's
    to say. Before the group exists every rank checks the same input: on each node the first rank
    says it, and the others wait (at most ``INPUT_ERROR_WAIT_S``) for torchrun to end them after
    rank 0 has reported it, so that rank 0's line is never cut short by their exit.
    """
    _State.failing = True
    w = world()
    if w.size <= 1 or w.rank == 0:
        return str(exc)
    if isinstance(exc, ReplicatedError):
        return None
    if _State.group or w.local_rank == 0:
        return f"rank {w.rank}: {exc}"
    time.sleep(min(INPUT_ERROR_WAIT_S, timeout_s()))
    return None


# ---------------------------------------------------------------------------------------------
# Device and process group


def local_device(device: "torch.device") -> "torch.device":
    """Under torchrun a CUDA device becomes ``cuda:LOCAL_RANK`` (made current); others unchanged."""
    import torch

    w = world()
    _State.device_type = device.type
    if w.size <= 1 or device.type != "cuda":
        return device
    if device.index not in (None, w.local_rank):
        raise TpoolError(f"under torchrun each rank uses cuda:LOCAL_RANK; give --device cuda (or auto), not {device}")
    count = torch.cuda.device_count()
    if w.local_rank >= count:
        raise TpoolError(f"rank {w.rank} has LOCAL_RANK {w.local_rank} but this node has {count} CUDA device(s): "
                         f"start at most {count} processes per node (--nproc-per-node {count})")
    torch.cuda.set_device(w.local_rank)
    return torch.device("cuda", w.local_rank)


def ensure_group() -> bool:
    """Join the process group once (NCCL for CUDA ranks, gloo otherwise); False without torchrun."""
    w = world()
    if w.size <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        _State.group = True
        return True
    backend = "nccl" if _State.device_type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    except Exception as exc:  # a rendezvous that never completes, an unreachable master
        raise ReplicatedError(f"distributed: rank {w.rank} of {w.size} could not join the process group "
                              f"({backend}): {_first_line(exc)}") from None
    _State.group = True
    import atexit

    atexit.register(_leave_group)
    return True


def _leave_group() -> None:
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # exiting anyway
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:240] if text else type(exc).__name__


def _all_gather(obj: Any, what: str) -> list[Any]:
    """Every rank's ``obj``, in rank order; a rank that died or stalls is one clear error."""
    import torch.distributed as dist

    for bar in _State.live:
        bar.flush()
    parts: list[Any] = [None] * world().size
    try:
        dist.all_gather_object(parts, obj)
    except Exception as exc:
        raise ReplicatedError(f"distributed: {what}: another rank failed or did not answer within "
                              f"{timeout_s():.0f} s ({_first_line(exc)})") from None
    for bar in _State.live:
        bar.refresh()
    return parts


def _gather_checked(fn: Callable[[], Any], what: str) -> list[Any]:
    """Run ``fn`` on every rank and gather its value; a TpoolError on any rank is raised on all."""
    try:
        mine: tuple[str, Any] = ("ok", fn())
    except TpoolError as exc:
        mine = ("error", str(exc))
    parts = _all_gather(mine, what)
    for kind, value in parts:
        if kind == "error":
            raise ReplicatedError(value)
    return [value for _, value in parts]


def from_main(fn: Callable[[], Any], what: str = "reading the results folder") -> Any:
    """``fn()`` run on rank 0 alone (it reads or writes files), its value given to every rank.

    A TpoolError on rank 0 is raised on every rank (rank 0 says it). Without torchrun: ``fn()``.
    """
    if not ensure_group():
        return fn()
    import torch.distributed as dist

    payload: list[Any] = [None]
    if is_main():
        try:
            payload[0] = ("ok", fn())
        except TpoolError as exc:
            payload[0] = ("error", str(exc))
    try:
        dist.broadcast_object_list(payload, src=0)
    except Exception as exc:
        raise ReplicatedError(f"distributed: {what}: rank 0 failed or did not answer within "
                              f"{timeout_s():.0f} s ({_first_line(exc)})") from None
    kind, value = payload[0]
    if kind == "error":
        raise ReplicatedError(value)
    return value


# ---------------------------------------------------------------------------------------------
# Sharding and combining


def shard(folder: "ImageFolder") -> "ImageFolder":
    """This rank's share of ``folder``: samples r, r + W, ... of the sorted list (no padding).

    Idempotent; the folder itself without torchrun. ``total_files`` and ``limit`` stay the
    global ones; the share's fingerprint differs, so each rank's disk cache is its own file.
    """
    if folder.shard is not None or not ensure_group():
        return folder
    w = world()
    return replace(folder, samples=folder.samples[w.rank :: w.size], shard=(w.rank, w.size))


def _merge_skipped(parts: Sequence[Sequence[dict[str, str]]]) -> list[dict[str, str]]:
    """Skipped files of all ranks in the single-process order (the folder's sorted relative paths)."""
    return sorted((s for part in parts for s in part), key=lambda s: s["path"])


def gather_skipped(skipped: Sequence[dict[str, str]], share: Shard) -> list[dict[str, str]]:
    """All ranks' skipped files (a sweep's decode) in the global order; the list itself unsharded."""
    if share is None:
        return list(skipped)
    return _merge_skipped(_all_gather(list(skipped), "gathering the skipped files"))


def combine_eval(result: "EvalResult", share: Shard) -> "EvalResult":
    """The whole folder's result from each rank's result on its share (every rank gets it).

    Counts and file numbers are summed (exact); skipped files and predictions are put in the
    global order; model-only img/s is the sum of the ranks' figures (they run at the same time),
    end-to-end img/s all images over the slowest rank's wall time. ``world_size`` goes into the
    configuration either way.
    """
    if share is None:
        result.config.setdefault("world_size", 1)
        return result
    rank, size = share
    import torch

    mine = {
        "images": result.images, "files": result.files, "correct1": result.correct1, "correct5": result.correct5,
        "skipped": result.skipped, "model_ips": result.model_only_ips, "e2e": result.end_to_end_ips is not None,
        "eval_s": result.eval_seconds, "model_s": result.model_seconds, "timed": result.timed_images,
        "compile_s": result.compile_seconds, "interrupted": result.interrupted,
        "preds": None if result.predictions is None else result.predictions.tolist(),
        "pred_idx": None if result.prediction_indices is None else [rank + i * size for i in result.prediction_indices.tolist()],
    }
    parts = _all_gather(mine, "combining the ranks' counts")
    images = sum(p["images"] for p in parts)
    c1, c5 = sum(p["correct1"] for p in parts), sum(p["correct5"] for p in parts)
    files = sum(p["files"] for p in parts)
    interrupted = any(p["interrupted"] for p in parts)
    skipped = _merge_skipped([p["skipped"] for p in parts])
    if images == 0 and not interrupted:
        first = f" (e.g. {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
        raise ReplicatedError(f"none of the {files} files under {result.config.get('data')} could be decoded as an image{first}")
    rank_ips = [p["model_ips"] for p in parts]
    wall = max(p["eval_s"] for p in parts)
    compiled = [p["compile_s"] for p in parts if p["compile_s"] is not None]
    config = {**result.config, "files": files, "world_size": size,
              "rank_model_only_img_s": [round(v, 2) if v else None for v in rank_ips]}
    preds = idx = None
    if result.predictions is not None:
        pairs = sorted(zip((i for p in parts for i in p["pred_idx"]), (c for p in parts for c in p["preds"])))
        idx = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        preds = torch.tensor([c for _, c in pairs], dtype=torch.long)
    return replace(
        result,
        top1=100.0 * c1 / images if images else float("nan"),
        top5=100.0 * c5 / images if images else float("nan"),
        images=images, files=files, correct1=c1, correct5=c5, skipped=skipped,
        model_only_ips=sum(v for v in rank_ips if v) or None,
        end_to_end_ips=images / wall if images and wall > 0 and all(p["e2e"] for p in parts if p["images"]) else None,
        eval_seconds=wall,
        model_seconds=sum(p["model_s"] for p in parts),
        timed_images=sum(p["timed"] for p in parts),
        compile_seconds=max(compiled) if compiled else None,
        interrupted=interrupted, config=config, predictions=preds, prediction_indices=idx,
    )


# ---------------------------------------------------------------------------------------------
# One progress bar with the global count


class _GlobalProgress:
    """Adds this rank's progress to a counter in the rendezvous store; rank 0 shows the total.

    The store is looked up at the first update (the group is joined lazily, after the checks):
    without one, rank 0 shows its own share and the others nothing.
    """

    def __init__(self, advance: Callable[[int], None], key: str, main: bool) -> None:
        self.advance, self.key, self.main = advance, key, main
        self.store: Any = None
        self.pending = 0
        self.shown = 0
        self.last = 0.0

    def _store(self) -> Any:
        if self.store is None and _State.group:
            try:
                from torch.distributed.distributed_c10d import _get_default_store

                self.store = _get_default_store()
            except Exception:
                self.store = False
        return self.store

    def __call__(self, n: int) -> None:
        self.pending += n
        if self.main or time.monotonic() - self.last >= PROGRESS_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        store = self._store()
        if not store:
            if self.main:
                self.advance(self.pending)
            self.pending = 0
            return
        total = store.add(self.key, self.pending)
        self.pending = 0
        self.last = time.monotonic()
        self._show(total)

    def refresh(self) -> None:
        store = self._store()
        if self.main and store:
            self._show(store.add(self.key, 0))

    def _show(self, total: int) -> None:
        if self.main and total > self.shown:
            self.advance(total - self.shown)
            self.shown = total


def global_progress(advance: Callable[[int], None]) -> Callable[[int], None]:
    """A progress callback counting every rank's files (rank 0's bar shows them); unchanged alone.

    Made on every rank in the same order (its store key is drawn here), before or after the group
    is joined.
    """
    if not launched():
        return advance
    bar = _GlobalProgress(advance, f"tpool/progress/{next(_State.seq)}", is_main())
    _State.live = _State.live[-3:] + [bar]
    return bar


# ---------------------------------------------------------------------------------------------
# Commands that are not sharded


def refuse(what: str, instead: str) -> None:
    """One clear line (on rank 0) for a command or option that does not run under torchrun."""
    if launched():
        raise TpoolError(f"{what} does not run under torchrun: {instead}")


def reconstruction_on_folder(model: Any, folder: Any, configs: Sequence[Any], limit: int = 16, batch_size: int = 16,
                             prop_attn: bool = False, seed: int = 0) -> list[dict[str, Any]]:
    """:func:`tpool_cli.diagnose.reconstruction_on_folder`, its images sharded under torchrun.

    Each rank measures its share; the per-layer means are recombined weighted by the ranks' image
    counts (float64: equal to the single-process means up to rounding, the counts exactly).
    """
    from .data import images_in_folder, load_images
    from .diagnose import reconstruction_on_folder as on_folder, reconstruction_rows

    if not launched():
        return on_folder(model, folder, configs, limit=limit, batch_size=batch_size, prop_attn=prop_attn, seed=seed)
    if limit < 1:
        raise TpoolError(f"--limit must be >= 1, got {limit}")
    paths = images_in_folder(folder, limit)
    ensure_group()
    w = world()
    mine = paths[w.rank :: w.size]

    def measure() -> list[dict[str, Any]]:
        if not mine:
            return []
        images, _ = load_images(mine, model)
        return reconstruction_rows(model, images, configs, batch_size=batch_size, prop_attn=prop_attn, seed=seed)

    parts = [p for p in _gather_checked(measure, "combining the reconstruction errors") if p]
    rows = []
    for i, row in enumerate(parts[0]):
        shares = [p[i] for p in parts]
        n = sum(s["images"] for s in shares)
        rows.append({**row, "images": n,
                     "recon": sum(s["recon"] * s["images"] for s in shares) / n,
                     "recon_weighted": sum(s["recon_weighted"] * s["images"] for s in shares) / n})
    return rows
