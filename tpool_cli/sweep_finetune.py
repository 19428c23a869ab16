"""`tpool pareto --finetune-epochs E`: each reducing point fine-tuned with its operator in place, then evaluated.

Policy of a fine-tuned sweep, kept apart from :mod:`tpool_cli.sweep` (which runs the points): the
recipe (:func:`sweep_finetune_settings`, the demo's defaults on the built-in demo), the points
(:func:`with_finetuned`: every off-the-shelf point and, after them, the same points fine-tuned, so
the frontier is drawn before and after E epochs side by side), the train folder
(:func:`train_folder`), what a fine-tuned point's key adds (:func:`finetune_identity`) and the
fine-tune itself (:func:`finetuned_model`), which is :func:`tpool_cli.finetune.finetune` on a fresh
copy of the loaded model, into ``OUT/finetune/<point key>/``: its checkpoint makes a sweep killed
mid-fine-tune continue that point's training where the last epoch ended.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .data import ImageFolder, scan_folder
from .errors import TpoolError
from .finetune import DEMO_FINETUNE_DEFAULTS, FinetuneCallbacks, FinetuneSettings, check_folders, finetune
from .models import LoadedModel
from .patch import unpatch
from .sweep_plan import Point

FINETUNE_DIR = "finetune"  # OUT/finetune/<point key>/: last.pt, model.safetensors, model.json, train_log.jsonl


def sweep_finetune_settings(
    epochs: int, demo: bool, *, lr: Optional[float] = None, max_steps: Optional[int] = None,
    batch_size: Optional[int] = None, seed: int = 0,
) -> Optional[FinetuneSettings]:
    """The recipe of a fine-tuned sweep (None for E = 0: off the shelf only); the demo's defaults on the demo."""
    if epochs < 0:
        raise TpoolError(f"--finetune-epochs must be >= 0, got {epochs}")
    if epochs == 0:
        if lr is not None or max_steps is not None or batch_size is not None:
            raise TpoolError("--finetune-lr/--finetune-max-steps/--finetune-batch-size go with --finetune-epochs E > 0")
        return None
    base = FinetuneSettings()
    defaults = {**asdict(base), **(DEMO_FINETUNE_DEFAULTS if demo else {})}
    return FinetuneSettings(
        epochs=epochs, lr=lr if lr is not None else defaults["lr"], crop_scale=defaults["crop_scale"],
        hflip=defaults["hflip"], batch_size=batch_size or base.batch_size, seed=seed, max_steps=max_steps,
    )


def with_finetuned(points: Sequence[Point], settings: Optional[FinetuneSettings]) -> list[Point]:
    """The off-the-shelf points, then (with a recipe) every reducing point again, fine-tuned."""
    points = list(points)
    if settings is None:
        return points
    return points + [replace(p, finetune=settings) for p in points if not p.is_baseline]


def train_folder(
    train: Optional[str | Path], demo: bool, class_map: Optional[str | Path], settings: Optional[FinetuneSettings],
) -> Optional[ImageFolder]:
    """The folder fine-tunes train on: ``--train`` (with ``--data``'s class map), or the demo's training split."""
    if settings is None:
        if train is not None:
            raise TpoolError("--train goes with --finetune-epochs E > 0")
        return None
    if train is None:
        if not demo:
            raise TpoolError("--finetune-epochs needs --train TRAIN_FOLDER (same classes and class map as --data)")
        from .demo import ensure_demo_data

        split = ensure_demo_data(split="train")
        return scan_folder(split.root, class_map=split.class_map)
    return scan_folder(train, class_map=class_map)


def check_train(train: Optional[ImageFolder], val: ImageFolder, points: Sequence[Point]) -> None:
    """A fine-tuned point needs a train folder labelled like the sweep's data, with all its classes."""
    if any(p.finetune is not None for p in points):
        if train is None:
            raise TpoolError("fine-tuned points need a train folder (run_sweep(train=...))")
        check_folders(train, val)


def finetune_identity(settings: FinetuneSettings, train_fingerprint: Optional[str]) -> dict[str, Any]:
    """What a fine-tuned point's key adds to the off-the-shelf point's: the recipe and the train data."""
    return {"epochs": settings.epochs, "recipe": asdict(settings), "train_fingerprint": train_fingerprint}


def finetuned_model(
    loaded: LoadedModel, point: Point, train: ImageFolder, out: Path, *, device: torch.device, amp: Optional[str],
    prop_attn: Optional[bool], seed: int, workers: Optional[int], advance: Callable[[int], None],
) -> tuple[LoadedModel, dict[str, Any]]:
    """A fresh copy of ``loaded`` patched for ``point`` and fine-tuned into ``out`` (resumed from its
    checkpoint when there is one), and the row's ``finetune`` record (where the weights are, how far it got)."""
    assert point.finetune is not None
    unpatch(loaded.model)  # the copy starts from the plain model the sweep loaded
    copied = replace(loaded, model=copy.deepcopy(loaded.model))
    point.apply(copied.model, prop_attn=prop_attn, seed=seed)
    callbacks = FinetuneCallbacks(batch=lambda files, loss: advance(files))
    result = finetune(copied, train, None, out, point.finetune, device=device, amp=amp, workers=workers or 0,
                      resume=True, callbacks=callbacks)
    record = {
        "epochs_done": result.state.epoch, "updates": result.state.updates, "resumed_epochs": result.resumed_epochs,
        "train_data": str(train.root), "train_files": len(train), "weights_finetuned": str(result.model_path),
    }
    copied.model.eval()
    return copied, record
