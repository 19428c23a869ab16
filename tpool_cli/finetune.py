"""Fine-tune a patched ViT with its operator in place: what accuracy does a short fine-tune recover?

Token Pooling's headline and most published numbers of its peers come after fine-tuning with the
operator in every forward pass. This module does that with timm's own training parts, so the
recipe is the one practitioners know:

* data: an ImageNet-style train folder (:func:`tpool_cli.data.scan_folder`, the same label space
  as evaluation), augmented by ``timm.data.create_transform(is_training=True)`` (random resized
  crop with a documented scale, optional horizontal flip, no colour jitter, no RandAugment: a
  short fine-tune of a converged model wants light augmentation);
* loss: label-smoothed cross-entropy (``timm.loss.LabelSmoothingCrossEntropy``) mixed with
  knowledge distillation from the unpatched model (KL divergence of the logits, teacher in eval
  mode and without gradients), on by default as in token-reduction papers (DynamicViT, EViT);
* optimiser and schedule: ``timm.optim.create_optimizer_v2`` (AdamW, no weight decay on norms,
  biases and the class/position tokens) and ``timm.scheduler.CosineLRScheduler`` stepped per
  update with a linear warm-up.

Determinism and resume: every epoch draws its shuffling, augmentation and dropout from seeds that
are a pure function of (seed, epoch), and a checkpoint (weights, optimiser, update count, log) is
written atomically after every epoch. A run killed at any point resumes from its last checkpoint
and ends, on the CPU, with exactly the weights of an uninterrupted run.

Gradients: every operator of tpool forms its output tokens by gathers and (weighted) averages of
its input tokens, so gradients flow through the kept, pooled or merged tokens; the discrete
decisions (top-k selections, argmin assignments, matchings, random draws) are constants of the
forward pass, as in ToMe's and EViT's training code. ``docs/finetune.md`` lists it per operator.

Under torchrun the model is wrapped in DistributedDataParallel and each rank trains on its own
share of every epoch (``DistributedSampler``); evaluation is sharded exactly by
:func:`tpool_cli.evaluate.evaluate`. The library never prints: progress goes through callbacks.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageFolder, Sample, scan_folder
from .device import resolve_amp, synchronize
from .errors import TpoolError

CHECKPOINT_NAME = "last.pt"  # training state for resume (weights, optimiser, update count, log)
MODEL_NAME = "model.safetensors"  # the fine-tuned timm model, loadable with --weights
MODEL_RECORD_NAME = "model.json"
LOG_NAME = "train_log.jsonl"
RESULTS_NAME = "results.jsonl"
# The built-in demo's recipe (a small model on digits, which are not flip-invariant): `tpool finetune` and
# `tpool pareto --finetune-epochs` on the demo.
DEMO_FINETUNE_DEFAULTS = {"lr": 5e-4, "crop_scale": 0.75, "hflip": 0.0}


@dataclass(frozen=True)
class FinetuneSettings:
    """The recipe. Defaults are for a short fine-tune of a converged model (a few epochs, small lr)."""

    epochs: int = 5
    lr: float = 1e-4  # peak learning rate (AdamW), reached after the warm-up
    min_lr: float = 1e-6  # end of the cosine
    warmup_epochs: float = 0.5
    weight_decay: float = 0.05
    batch_size: int = 64
    label_smoothing: float = 0.1
    distill: bool = True
    distill_alpha: float = 0.5  # loss = (1 - alpha) * CE + alpha * KD when distilling
    distill_temperature: float = 1.0
    crop_scale: float = 0.35  # lower bound of RandomResizedCrop's area scale (timm's default 0.08 is for training from scratch)
    hflip: float = 0.5
    seed: int = 0
    max_steps: Optional[int] = None  # stop after this many updates in all (quick tries, tests)

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr:g}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (0.0 <= self.distill_alpha <= 1.0, f"distillation weight must be in [0, 1], got {self.distill_alpha:g}"),
            (self.distill_temperature > 0, f"distillation temperature must be > 0, got {self.distill_temperature:g}"),
            (0.0 < self.crop_scale <= 1.0, f"--crop-scale must be in (0, 1], got {self.crop_scale:g}"),
            (0.0 <= self.hflip <= 1.0, f"--hflip must be in [0, 1], got {self.hflip:g}"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TpoolError(message)


@dataclass
class TrainState:
    """What a checkpoint holds besides the weights and the optimiser."""

    epoch: int = 0  # epochs completed
    updates: int = 0  # optimiser steps taken
    log: list[dict[str, Any]] = field(default_factory=list)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softened logits, times T^2 (Hinton et al.); 0 when they agree."""
    t = temperature
    log_s = F.log_softmax(student.float() / t, dim=-1)
    log_t = F.log_softmax(teacher.float() / t, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (t * t)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's shuffling, augmentation and dropout: resume needs no RNG state."""
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**31 - 1)


class _TrainDataset(torch.utils.data.Dataset):
    """Item i -> (augmented, normalised image or None, label); undecodable files are dropped by the collate."""

    def __init__(self, samples: list[Sample], transform: Callable) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Optional[torch.Tensor], int]:
        from PIL import Image

        try:
            with Image.open(self.samples[i].path) as img:
                return self.transform(img.convert("RGB")), self.samples[i].label
        except (OSError, SyntaxError, ValueError):
            return None, self.samples[i].label


def _collate(items: list[tuple[Optional[torch.Tensor], int]]) -> tuple[Optional[torch.Tensor], torch.Tensor, int]:
    good = [(x, y) for x, y in items if x is not None]
    if not good:
        return None, torch.empty(0, dtype=torch.long), len(items)
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), len(items) - len(good)


def train_transform(cfg: dict[str, Any], settings: FinetuneSettings) -> Callable:
    """timm's training transform at the model's input size, with the light augmentation above."""
    from timm.data import create_transform

    return create_transform(
        input_size=cfg["input_size"],
        is_training=True,
        scale=(settings.crop_scale, 1.0),
        hflip=settings.hflip,
        color_jitter=0.0,
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
    )


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def epoch_loader(
    dataset: _TrainDataset, settings: FinetuneSettings, epoch: int, workers: int
) -> torch.utils.data.DataLoader:
    """The batches of one epoch, shuffled by the epoch's seed (sharded by rank under torchrun)."""
    seed = epoch_seed(settings.seed, epoch)
    rank, world = _rank_and_world()
    gen = torch.Generator().manual_seed(seed)
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=settings.seed)
        sampler.set_epoch(epoch)
    else:
        sampler = torch.utils.data.RandomSampler(dataset, generator=gen)
    return torch.utils.data.DataLoader(
        dataset, batch_size=settings.batch_size, sampler=sampler, num_workers=workers,
        collate_fn=_collate, generator=gen, drop_last=False, persistent_workers=False,
    )


def check_folders(train: ImageFolder, val: Optional[ImageFolder]) -> None:
    """A train folder with classes, and a val folder labelled in the same space with the same classes."""
    if len(train) == 0:
        raise TpoolError(f"the train folder {train.root} holds no images in class folders")
    if val is None:
        return
    if val.label_space != train.label_space:
        raise TpoolError(f"train and val folders are labelled differently ({train.label_space} vs {val.label_space})")
    extra = sorted(set(val.classes) - set(train.classes))
    if extra:
        raise TpoolError(
            f"the val folder has {len(extra)} class(es) the train folder lacks (e.g. {extra[0]!r}): "
            "a fine-tune cannot learn them"
        )


def check_reduces(model: nn.Module) -> None:
    """The operator and schedule must remove tokens somewhere: fine-tuning the baseline is another job."""
    from .patch import planned_counts

    counts = planned_counts(model)
    if all(k >= n for n, k in counts):
        op = getattr(model, "tpool_operator", None)
        raise TpoolError(
            f"{getattr(op, 'name', 'the operator')} with this schedule reduces no token "
            "(keep 1.0, r 0 or the baseline): nothing to fine-tune for"
        )


def timm_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights under timm's own names (as the unpatched model has them), contiguous, on the CPU."""
    from .patch import is_patched

    net = copy.deepcopy(model) if is_patched(model) else model
    if is_patched(net):
        from .patch import unpatch

        unpatch(net)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary name in the same folder and rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, key: dict) -> None:
    payload = {
        "key": key,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "epoch": state.epoch,
        "updates": state.updates,
        "log": state.log,
    }
    _atomic_write(out / CHECKPOINT_NAME, lambda p: torch.save(payload, p))


def load_checkpoint(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, key: dict) -> Optional[TrainState]:
    """The state of an earlier run with the same key, loaded into model and optimiser; None if there is none."""
    path = out / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: the user's to remove
        raise TpoolError(f"cannot read the checkpoint {path} ({type(exc).__name__}); remove it or use --no-resume") from None
    if payload.get("key") != key:
        raise TpoolError(f"{path} is from another fine-tune (other model, operator, schedule or recipe); use another --out or --no-resume")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    return TrainState(epoch=int(payload["epoch"]), updates=int(payload["updates"]), log=list(payload["log"]))


def export_model(out: Path, model: nn.Module, record: dict[str, Any]) -> Path:
    """The fine-tuned timm model as safetensors (operator and schedule in its metadata) plus a JSON record."""
    from safetensors.torch import save_file

    path = out / MODEL_NAME
    meta = {"format": "pt", "tpool": json.dumps(record, sort_keys=True)}
    _atomic_write(path, lambda p: save_file(timm_state_dict(model), str(p), metadata=meta))
    _atomic_write(out / MODEL_RECORD_NAME, lambda p: p.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n"))
    return path


@dataclass
class Trainer:
    """The parts of one fine-tune: student (patched), teacher (unpatched copy), loss, optimiser, schedule."""

    student: nn.Module  # the patched model (possibly DDP-wrapped in ``forward``)
    teacher: Optional[nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    settings: FinetuneSettings
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    forward: nn.Module  # what runs the student's forward (the student, DDP, or torch.compile of it)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from timm.loss import LabelSmoothingCrossEntropy

        s = self.settings
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            logits = self.forward(x)
            ce = LabelSmoothingCrossEntropy(smoothing=s.label_smoothing)(logits.float(), y) if s.label_smoothing > 0 else F.cross_entropy(logits.float(), y)
            if self.teacher is None:
                return ce
            with torch.no_grad():
                target = self.teacher(x)
        return (1.0 - s.distill_alpha) * ce + s.distill_alpha * distillation_loss(logits, target, s.distill_temperature)

    def step(self, x: torch.Tensor, y: torch.Tensor, updates: int) -> float:
        """One update; returns the batch loss (a host sync per step, which training tolerates)."""
        loss = self.loss(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step_update(updates + 1)
        return float(loss.detach())

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def build_trainer(
    student: nn.Module, teacher: Optional[nn.Module], settings: FinetuneSettings, steps_per_epoch: int,
    device: torch.device, amp_dtype: Optional[torch.dtype], compile: bool = False,
) -> Trainer:
    """Optimiser (timm AdamW, no decay on norms/biases/tokens), per-update cosine schedule with warm-up."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    optimizer = create_optimizer_v2(student, opt="adamw", lr=settings.lr, weight_decay=settings.weight_decay)
    total = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total = min(total, settings.max_steps)
    warmup = min(total - 1, int(round(settings.warmup_epochs * steps_per_epoch))) if total > 1 else 0
    import logging

    logging.getLogger("timm.scheduler.cosine_lr").setLevel(logging.ERROR)  # its note on one-step cosines is not for users
    scheduler = CosineLRScheduler(
        optimizer, t_initial=max(1, total - warmup), lr_min=settings.min_lr, warmup_t=warmup,
        warmup_lr_init=settings.lr * 0.01, warmup_prefix=True, t_in_epochs=False,
    )
    forward: nn.Module = student
    if _rank_and_world()[1] > 1:
        ids = [device.index] if device.type == "cuda" else None
        forward = nn.parallel.DistributedDataParallel(student, device_ids=ids)
    if compile:
        forward = torch.compile(forward)  # type: ignore[assignment]
    return Trainer(student, teacher, optimizer, scheduler, settings, device, amp_dtype, forward)


def run_epoch(
    trainer: Trainer, loader: torch.utils.data.DataLoader, state: TrainState,
    on_batch: Optional[Callable[[int, float], None]] = None,
) -> dict[str, Any]:
    """Train one epoch (or up to ``max_steps``); returns its log entry without the validation figures."""
    trainer.student.train()
    if trainer.teacher is not None:
        trainer.teacher.eval()
    total_loss, seen, skipped, seconds = 0.0, 0, 0, 0.0
    for x, y, bad in loader:
        skipped += bad
        if x is None:
            continue
        if trainer.settings.max_steps is not None and state.updates >= trainer.settings.max_steps:
            break
        x, y = x.to(trainer.device), y.to(trainer.device)
        t0 = time.perf_counter()
        loss = trainer.step(x, y, state.updates)
        synchronize(trainer.device)
        seconds += time.perf_counter() - t0
        state.updates += 1
        total_loss += loss * len(y)
        seen += len(y)
        if on_batch is not None:
            on_batch(len(y) + bad, loss)
    return {
        "epoch": state.epoch + 1,
        "updates": state.updates,
        "loss": round(total_loss / seen, 6) if seen else None,
        "lr": trainer.lr,
        "images": seen,
        "skipped": skipped,
        "train_img_s": round(seen / seconds, 2) if seconds > 0 else None,
    }


def seed_epoch(settings: FinetuneSettings, epoch: int) -> None:
    """Seed torch's and Python's global generators (augmentation, dropout) for this epoch."""
    seed = epoch_seed(settings.seed, epoch)
    torch.manual_seed(seed)
    random.seed(seed)


def settings_key(settings: FinetuneSettings, model_config: dict[str, Any], train: ImageFolder) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: recipe, model, weights, operator, schedule, data."""
    keep = ("model", "weights_sha256", "op", "op_options", "schedule", "prop_attn", "seed", "img_size")
    return {
        "settings": {k: v for k, v in asdict(settings).items()},
        "model": {k: model_config.get(k) for k in keep},
        "train": {"root": str(train.root), "files": len(train), "label_space": train.label_space},
    }


def training_record(settings: FinetuneSettings, model_config: dict[str, Any], state: TrainState, train: ImageFolder) -> dict[str, Any]:
    """The JSON next to the exported weights: how they were made (operator and schedule included)."""
    return {
        "base": {k: model_config.get(k) for k in ("model", "weights", "weights_sha256")},
        "op": model_config.get("op"),
        "op_options": model_config.get("op_options"),
        "schedule": model_config.get("schedule"),
        "keep": model_config.get("keep"),
        "layers": model_config.get("layers"),
        "tokens": model_config.get("tokens"),
        "prop_attn": model_config.get("prop_attn"),
        "finetune": asdict(settings),
        "epochs_done": state.epoch,
        "updates": state.updates,
        "train_data": str(train.root),
        "train_files": len(train),
        "world_size": _rank_and_world()[1],
    }


def make_teacher(model: nn.Module, distill: bool) -> Optional[nn.Module]:
    """An unpatched, frozen copy of the model before fine-tuning (None without distillation)."""
    if not distill:
        return None
    from .patch import is_patched, unpatch

    teacher = copy.deepcopy(model)
    if is_patched(teacher):
        unpatch(teacher)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def steps_per_epoch(n: int, settings: FinetuneSettings) -> int:
    world = _rank_and_world()[1]
    return max(1, math.ceil(math.ceil(n / world) / settings.batch_size))


def resolve_training_amp(amp: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast on CUDA by default, fp32 on the CPU (as evaluation)."""
    return resolve_amp(amp, device)


def scan_train(root: str | Path, class_map: Optional[str | Path]) -> ImageFolder:
    return scan_folder(root, class_map=class_map)


@dataclass
class FinetuneCallbacks:
    """How a command follows a fine-tune (the library never prints)."""

    epoch_start: Callable[[int, int, int], None] = lambda epoch, epochs, files: None  # (epoch 1-based, epochs, files)
    batch: Callable[[int, float], None] = lambda files, loss: None
    epoch_end: Callable[[dict[str, Any]], None] = lambda entry: None


@dataclass
class FinetuneResult:
    state: TrainState
    model_path: Path
    row: Optional[dict[str, Any]]  # evaluate's row of the fine-tuned model on the val folder (None without one)
    resumed_epochs: int  # epochs taken over from an earlier run's checkpoint


def _validate(model: nn.Module, val: Optional[ImageFolder], device: torch.device, amp: Optional[str], batch_size: int, workers: int, count: bool):
    if val is None:
        return None
    from .evaluate import evaluate

    return evaluate(model, val, device=device, amp=amp, batch_size=batch_size, workers=workers, count=count)


def _prepare_out(out: Path, resume: bool) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise TpoolError(f"cannot write to --out {out} ({exc.strerror or exc})") from None
    if not resume:
        for name in (CHECKPOINT_NAME, LOG_NAME):
            if (out / name).exists():
                (out / name).unlink()


def finetune(
    loaded: Any,
    train: ImageFolder,
    val: Optional[ImageFolder],
    out: Path,
    settings: FinetuneSettings,
    *,
    device: torch.device,
    amp: Optional[str] = None,
    compile: bool = False,
    workers: int = 0,
    resume: bool = True,
    callbacks: Optional[FinetuneCallbacks] = None,
) -> FinetuneResult:
    """Fine-tune ``loaded.model`` (already patched) on ``train``; evaluate on ``val`` after every epoch.

    Args:
        loaded: a :class:`tpool_cli.models.LoadedModel` whose model carries the patch.
        train, val: scanned folders in the same label space (``val`` may be None).
        out: folder for ``last.pt`` (resume), ``model.safetensors`` + ``model.json`` (the result),
            ``train_log.jsonl`` and ``results.jsonl`` (evaluate's row of the final model).
        settings: the recipe (:class:`FinetuneSettings`).
        resume: take over an earlier run's checkpoint with the same key; False starts afresh.
    Raises KeyboardInterrupt after the last completed epoch's checkpoint is safely on disk.
    """
    from .evaluate import model_config

    cb = callbacks or FinetuneCallbacks()
    model = loaded.model
    check_folders(train, val)
    check_reduces(model)
    _prepare_out(out, resume)
    amp_dtype = resolve_training_amp(amp, device)
    from .distributed import ensure_group

    ensure_group()  # under torchrun: join the process group (DDP, sharded evaluation) after the checks
    rank, _ = _rank_and_world()
    config = model_config(model, loaded)
    key = settings_key(settings, config, train)
    model.to(device)
    teacher = make_teacher(model, settings.distill)
    if teacher is not None:
        teacher.to(device)
    from .data import data_config

    dataset = _TrainDataset(train.samples, train_transform(data_config(model), settings))
    trainer = build_trainer(model, teacher, settings, steps_per_epoch(len(train), settings), device, amp_dtype, compile)
    state = (load_checkpoint(out, model, trainer.optimizer, key) if resume else None) or TrainState()
    resumed = state.epoch
    trainer.scheduler.step_update(state.updates)
    while state.epoch < settings.epochs and not (settings.max_steps is not None and state.updates >= settings.max_steps):
        seed_epoch(settings, state.epoch)
        cb.epoch_start(state.epoch + 1, settings.epochs, len(train))
        entry = run_epoch(trainer, epoch_loader(dataset, settings, state.epoch, workers), state, cb.batch)
        result = _validate(model, val, device, amp, settings.batch_size, workers, count=False)
        if result is not None:
            entry.update(val_top1=round(result.top1, 4), val_top5=round(result.top5, 4), val_images=result.images)
        state.epoch += 1
        state.log.append(entry)
        if rank == 0:
            save_checkpoint(out, model, trainer.optimizer, state, key)
            _atomic_write(out / LOG_NAME, lambda p: p.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in state.log)))
        cb.epoch_end(entry)
    record = training_record(settings, config, state, train)
    path = export_model(out, model, record) if rank == 0 else out / MODEL_NAME
    final = _validate(model, val, device, amp, settings.batch_size, workers, count=True)
    row = None
    if final is not None:
        row = final.row()
        row.update(finetune={k: record[k] for k in ("finetune", "epochs_done", "updates", "train_data", "train_files")},
                   weights_finetuned=str(path))
        if rank == 0:
            _atomic_write(out / RESULTS_NAME, lambda p: p.write_text(json.dumps(row, sort_keys=True) + "\n"))
    return FinetuneResult(state=state, model_path=path, row=row, resumed_epochs=resumed)
