"""`tpool evaluate` as a library: top-1/top-5 and throughput of a (patched) model on an image folder.

    from tpool_cli.models import load_model
    from tpool_cli.patch import patch
    from tpool_cli.evaluate import evaluate

    loaded = load_model("deit_small_patch16_224", weights="deit_s.safetensors")
    patch(loaded.model, "topk", keep=0.7)
    result = evaluate(loaded, "imagenet/val", limit=5000)
    print(result.top1, result.model_only_ips, result.row())

Two throughputs, because they answer different questions:

* **model-only** img/s: the forward pass alone. Each batch is decoded, copied to the device and
  normalised first; then the device is synchronised, the forward pass timed, and the device
  synchronised again. The first batch (warm-up: kernel selection, lazy init) and partial batches
  are left out when there are full batches to time.
* **end-to-end** img/s: images / wall time of the whole loop (reading, decoding, copying,
  normalising, forward, scoring), what a user waits for.

The data can be a folder (decoded per batch by DataLoader workers) or a :class:`DecodedImages`
cache (decoded once, possibly already on the device): both feed the model the same uint8
pixels normalised on the device, so they give identical predictions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .data import (
    DecodedImages, Decoder, ImageFolder, ProgressFn, data_config, folder_loader, normalize, scan_folder,
)
from .errors import TpoolError
from .distributed import combine_eval, shard
from .device import device_name, dtype_label, resolve_amp, resolve_device, steady_host_allocator, synchronize
from .models import LoadedModel
from .speedflags import eval_speed_fields, machine_load
from .stats import interval_fields

def versions() -> dict[str, str]:
    """Library versions a result depends on."""
    import timm
    from importlib import metadata

    try:
        tpool = metadata.version("tpool")
    except metadata.PackageNotFoundError:
        tpool = "unknown"
    return {"torch": torch.__version__, "timm": timm.__version__, "tpool": tpool}


@dataclass
class EvalResult:
    """Accuracy and speed of one configuration on one data set, with that configuration."""

    top1: float  # percent of evaluated images
    top5: float
    images: int  # evaluated (decoded) images
    files: int  # files planned (evaluated + skipped + not reached when interrupted)
    correct1: int
    correct5: int
    skipped: list[dict[str, str]]  # {"path": relative path, "reason": ...}
    model_only_ips: Optional[float]
    end_to_end_ips: Optional[float]
    eval_seconds: float
    model_seconds: float  # summed synchronised forward time of the timed batches
    timed_images: int  # images in the timed batches
    compile_seconds: Optional[float]
    interrupted: bool
    config: dict[str, Any] = field(default_factory=dict)
    predictions: Optional[torch.Tensor] = None  # top-1 class per evaluated image (keep_predictions)
    prediction_indices: Optional[torch.Tensor] = None  # sample index of each prediction
    batch_timings: list[tuple[int, float]] = field(default_factory=list)  # (images, seconds) per timed batch

    def row(self, skipped_paths: bool = True) -> dict[str, Any]:
        """The configuration and the measurements as one JSON-able row."""
        row = dict(self.config)
        row.update(
            top1=round(self.top1, 4),
            top5=round(self.top5, 4),
            images=self.images,
            correct1=self.correct1,
            correct5=self.correct5,
            skipped=len(self.skipped),
            model_only_img_s=round(self.model_only_ips, 2) if self.model_only_ips else None,
            end_to_end_img_s=round(self.end_to_end_ips, 2) if self.end_to_end_ips else None,
            eval_s=round(self.eval_seconds, 3),
            compile_s=round(self.compile_seconds, 3) if self.compile_seconds is not None else None,
            interrupted=self.interrupted,
        )
        row.update(eval_speed_fields(self.batch_timings, row))  # spread and flag of model_only_img_s
        row.update(interval_fields(self.correct1, self.correct5, self.images))  # 95% intervals (stats.py)
        if skipped_paths:
            row["skipped_files"] = self.skipped
        return row


def model_config(model: nn.Module, loaded: Optional[LoadedModel] = None) -> dict[str, Any]:
    """Model, weights and (when patched) operator + schedule, read from the model itself."""
    from .schedule import Schedule

    name = loaded.name if loaded else (getattr(model, "pretrained_cfg", {}) or {}).get("architecture", type(model).__name__)
    operator = getattr(model, "tpool_operator", None)
    schedule: Optional[Schedule] = getattr(model, "tpool_schedule", None)
    state = getattr(model, "tpool_state", None)
    depth = len(getattr(model, "blocks", []))
    reduces = operator is not None and operator.name != "none" and schedule is not None and not schedule.is_identity
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    config = {
        "model": name,
        "weights": loaded.weights if loaded else "unknown (nn.Module given)",
        "weights_sha256": loaded.weights_sha256 if loaded else None,
        "random_init": bool(loaded and not loaded.pretrained),
        "op": operator.label() if reduces else "none",
        # rope models: every option in the key (position's default reading changed for them)
        "op_options": operator.options(complete=bool(getattr(state, "uses_rope", False))) if reduces else {},
        "keep": (schedule.keep if schedule.keep is not None else None) if reduces else 1.0,
        "layers": list(schedule.reduction_layers(depth)) if reduces else [],
        "tokens": list(schedule.tokens) if reduces and schedule.tokens else None,
        "schedule": schedule.describe(depth) if reduces else "baseline",
        "prop_attn": bool(state.prop_attn) if reduces else False,
        "seed": int(state.seed) if reduces and operator.draws_random else 0,  # deterministic ops: any seed, same result
        "img_size": int(size[0]) if size is not None else None,
        "num_classes": int(getattr(model, "num_classes", 0)),
    }
    if reduces and schedule.r is not None:  # only then: other rows stay as they were
        config["r"] = list(schedule.r)  # tokens removed per block ([R]: R in every block)
    return config


def _folder_batches(
    folder: ImageFolder, cfg: dict[str, Any], batch_size: int, workers: Optional[int], device: torch.device
) -> Iterator[tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor, list[dict[str, str]], int]]:
    """(uint8 images on device, labels on device, sample indices, skipped, files in batch)."""
    labels = torch.tensor([s.label for s in folder.samples], dtype=torch.long)
    pin = device.type == "cuda"
    for images, indices, bad in folder_loader(folder, Decoder(cfg), batch_size, workers, pin_memory=pin):
        skipped = [{"path": folder.samples[i].rel, "reason": reason} for i, reason in bad]
        if images is None:
            yield None, None, indices, skipped, len(bad)
            continue
        y = labels[indices]
        if pin:
            y = y.pin_memory()
        yield images.to(device, non_blocking=pin), y.to(device, non_blocking=pin), indices, skipped, len(indices) + len(bad)


def _cached_batches(cache: DecodedImages, batch_size: int, device: torch.device):
    """Slices of the decode-once cache; copied to the device per batch only if it is not there."""
    n = len(cache)
    if cache.skipped:
        yield None, None, torch.empty(0, dtype=torch.long), list(cache.skipped), len(cache.skipped)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        x, y = cache.images[start:stop], cache.labels[start:stop]
        if x.device != device:
            x, y = x.to(device), y.to(device)
        yield x, y, cache.sample_indices[start:stop], [], stop - start


def _model_only(timings: list[tuple[int, float]], batch_size: int) -> tuple[Optional[float], int, float]:
    """(img/s, images, seconds) over the batches that represent steady state.

    Leaves out the first batch (warm-up) and partial batches whenever full batches remain; with
    a single batch it is all there is.
    """
    steady = [t for i, t in enumerate(timings) if i > 0 and t[0] == batch_size]
    if not steady:
        steady = timings[1:] or timings[:1]
    images = sum(n for n, _ in steady)
    seconds = sum(dt for _, dt in steady)
    return (images / seconds if seconds > 0 else None), images, seconds


def evaluate(
    model: nn.Module | LoadedModel,
    data: str | Path | ImageFolder | DecodedImages,
    *,
    class_map: Optional[str | Path] = None,
    device: str | torch.device = "auto",
    amp: Optional[str] = None,
    batch_size: int = 64,
    workers: Optional[int] = None,
    limit: Optional[int] = None,
    compile: bool = False,
    count: bool = True,
    progress: Optional[ProgressFn] = None,
    keep_predictions: bool = False,
) -> EvalResult:
    """Top-1/top-5, images/s and the full configuration of ``model`` (patched or not) on ``data``.

    Steps: resolve the data (:func:`_resolve_data`), check the labels fit the model, read the
    configuration off the model (:func:`_run_config`), score every batch (:class:`_Scorer`), then
    assemble the result (:func:`_assemble`).

    Args:
        model: a :class:`LoadedModel` (its weights go into the row) or a bare module.
        data: a folder path (scanned with ``class_map``/``limit``), a scanned :class:`ImageFolder`,
            or a :class:`DecodedImages` cache.
        device, amp: where and in which precision ('bf16', 'fp16', 'none'; None: bf16 on CUDA).
        batch_size, workers: images per batch and DataLoader workers (folders only).
        compile: ``torch.compile`` the model first (compile time reported apart).
        count: add fvcore GMACs per image of the configuration.
        progress: called with the number of files done after each batch.
        keep_predictions: keep the top-1 class of every image.

    Ctrl-C (KeyboardInterrupt) during the loop stops it and returns what was done with
    ``interrupted=True``.
    """
    loaded = model if isinstance(model, LoadedModel) else None
    net: nn.Module = loaded.model if loaded else model  # type: ignore[assignment]
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    amp_dtype = resolve_amp(amp, dev)
    if batch_size < 1:
        raise TpoolError(f"batch size must be >= 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise TpoolError(f"workers must be >= 0, got {workers}")
    folder, cache = _resolve_data(data, net, class_map, limit)
    _check_labels(folder, net)
    if cache is None:
        folder = shard(folder)  # under torchrun: this rank's share, after every check of the input
    net.eval().to(dev)
    if dev.type == "cpu":
        steady_host_allocator()  # CPU img/s must not depend on malloc's history (see device.py)
    config = _run_config(net, loaded, folder, dev, amp_dtype, batch_size, compile, count)
    cfg = data_config(net)
    scorer = _Scorer(net, dev, amp_dtype, batch_size, compile, int(getattr(net, "num_classes", 0) or 0), keep_predictions)
    source = (
        _cached_batches(cache.to(dev), batch_size, dev) if cache is not None
        else _folder_batches(folder, cfg, batch_size, workers, dev)
    )
    start = time.perf_counter()
    scorer.run(source, cfg["mean"], cfg["std"], progress)
    elapsed = time.perf_counter() - start - (scorer.compile_seconds or 0.0)
    config["speed_load"] = machine_load(dev.type, torch.get_num_threads(), dev.index or 0)  # see speedflags.py
    return _assemble(scorer, folder, config, elapsed, from_cache=cache is not None, keep_predictions=keep_predictions)


def _resolve_data(
    data: str | Path | ImageFolder | DecodedImages, net: nn.Module, class_map: Optional[str | Path], limit: Optional[int]
) -> tuple[ImageFolder, Optional[DecodedImages]]:
    """(the folder, the decode-once cache when ``data`` is one, checked against the model's preprocessing)."""
    if isinstance(data, DecodedImages):
        cfg = data_config(net)
        if data.cfg != cfg:
            raise TpoolError(f"the decoded images were preprocessed for {data.cfg['input_size']} input, the model needs {cfg['input_size']}")
        return data.folder, data
    folder = data if isinstance(data, ImageFolder) else scan_folder(data, class_map=class_map, limit=limit)
    return folder, None


def _check_labels(folder: ImageFolder, net: nn.Module) -> None:
    """Every class index of the folder must be one the model predicts."""
    num_classes = int(getattr(net, "num_classes", 0) or 0)
    if num_classes and folder.max_label >= num_classes:
        worst = max(folder.classes, key=lambda name: folder.classes[name])
        raise TpoolError(
            f"class folder {worst!r} maps to class index {folder.max_label} ({folder.label_space}), "
            f"but the model has {num_classes} classes; pass --class-map FILE for its label space"
        )


def _run_config(
    net: nn.Module, loaded: Optional[LoadedModel], folder: ImageFolder, dev: torch.device,
    amp_dtype: Optional[torch.dtype], batch_size: int, compile: bool, count: bool,
) -> dict[str, Any]:
    """The row's configuration: the model's (:func:`model_config`), GMACs, device, data, versions."""
    config = model_config(net, loaded)
    if count:
        from .flops import count_flops

        report = count_flops(net)
        config["gmacs"] = round(report.total, 6)
        config["patch_tokens"] = [report.layers[0].tokens_in] + [layer.tokens_out for layer in report.layers]
    config.update(
        device=dev.type,
        device_name=device_name(dev),
        dtype=dtype_label(amp_dtype),
        batch_size=batch_size,
        compile=compile,
        data=str(folder.root),
        label_space=folder.label_space,
        files=len(folder),
        limit=folder.limit,
        **versions(),
    )
    return config


class _Scorer:
    """Runs the batches through the model and counts top-1/top-5 hits on the device (no host sync per batch)."""

    def __init__(
        self, net: nn.Module, dev: torch.device, amp_dtype: Optional[torch.dtype], batch_size: int, compile: bool,
        num_classes: int, keep_predictions: bool,
    ) -> None:
        self.forward = torch.compile(net, dynamic=False) if compile else net
        self.dev, self.amp_dtype, self.batch_size, self.compile = dev, amp_dtype, batch_size, compile
        self.k5 = min(5, num_classes or 5)
        self.keep_predictions = keep_predictions
        self.correct1 = torch.zeros((), dtype=torch.long, device=dev)
        self.correct5 = torch.zeros((), dtype=torch.long, device=dev)
        self.images = 0
        self.skipped: list[dict[str, str]] = []
        self.timings: list[tuple[int, float]] = []  # (images, synchronised forward seconds) per batch
        self.preds: list[torch.Tensor] = []
        self.pred_idx: list[torch.Tensor] = []
        self.compile_seconds: Optional[float] = None
        self.interrupted = False

    def run(self, source: Iterator, mean: Any, std: Any, progress: Optional[ProgressFn]) -> None:
        """Score every batch of ``source``; Ctrl-C stops it with ``interrupted`` set."""
        try:
            with torch.inference_mode():
                for x, y, indices, bad, n_files in source:
                    self.skipped += bad
                    if x is not None:
                        self.score(normalize(x, mean, std), y, indices)
                    if progress is not None:
                        progress(n_files)
        except KeyboardInterrupt:
            self.interrupted = True
        synchronize(self.dev)

    def logits(self, inp: torch.Tensor, n: int) -> torch.Tensor:
        """The model's logits of the first ``n`` images, the forward pass alone timed."""
        dev = self.dev
        if self.compile and n < self.batch_size:  # one input shape: a partial batch would recompile
            inp = torch.cat([inp, inp.new_zeros((self.batch_size - n, *inp.shape[1:]))])
        with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            if self.compile and self.compile_seconds is None:
                synchronize(dev)
                t0 = time.perf_counter()
                self.forward(inp)  # compiles; timed apart and left out of both throughputs
                synchronize(dev)
                self.compile_seconds = time.perf_counter() - t0
            synchronize(dev)
            t0 = time.perf_counter()
            logits = self.forward(inp)[:n]
            synchronize(dev)
            self.timings.append((n, time.perf_counter() - t0))
        return logits

    def score(self, inp: torch.Tensor, y: torch.Tensor, indices: torch.Tensor) -> None:
        n = int(inp.shape[0])
        top = self.logits(inp, n).float().topk(self.k5, dim=1).indices
        self.correct1 += (top[:, 0] == y).sum()
        self.correct5 += (top == y[:, None]).any(dim=1).sum()
        self.images += n
        if self.keep_predictions:
            self.preds.append(top[:, 0].cpu())
            self.pred_idx.append(indices.cpu())


def _assemble(
    scorer: _Scorer, folder: ImageFolder, config: dict[str, Any], elapsed: float, *, from_cache: bool,
    keep_predictions: bool,
) -> EvalResult:
    """The :class:`EvalResult` of a finished (or interrupted) scoring loop."""
    images, skipped = scorer.images, scorer.skipped
    if images == 0 and not scorer.interrupted and folder.shard is None:  # sharded: combine_eval checks all ranks
        first = f" (e.g. {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
        raise TpoolError(f"none of the {len(folder)} files under {folder.root} could be decoded as an image{first}")
    c1, c5 = int(scorer.correct1.item()), int(scorer.correct5.item())
    model_ips, timed_images, model_seconds = _model_only(scorer.timings, scorer.batch_size)
    empty = torch.empty(0, dtype=torch.long) if keep_predictions else None
    return combine_eval(EvalResult(
        top1=100.0 * c1 / images if images else float("nan"),
        top5=100.0 * c5 / images if images else float("nan"),
        images=images,
        files=len(folder),
        correct1=c1,
        correct5=c5,
        skipped=skipped,
        model_only_ips=model_ips,
        # from a decode-once cache the loop reads no file: there is no end-to-end figure to give
        end_to_end_ips=images / elapsed if images and elapsed > 0 and not from_cache else None,
        eval_seconds=elapsed,
        model_seconds=model_seconds,
        timed_images=timed_images,
        compile_seconds=scorer.compile_seconds,
        interrupted=scorer.interrupted,
        config=config,
        batch_timings=scorer.timings,
        predictions=torch.cat(scorer.preds) if scorer.preds else empty,
        prediction_indices=torch.cat(scorer.pred_idx) if scorer.pred_idx else empty,
    ), folder.shard)  # under torchrun: every rank's counts summed, in the global image order
