"""Build timm ViT-family models and resolve their weights without ever hanging on a network.

Weights come from, in order: ``weights`` (a local .safetensors/.pth, loaded through timm's own
pretrained path so its checkpoint filters run; .pth with ``weights_only``), weights a package
ships (the built-in demo model), or timm's usual resolution (local cache, then the hub). Before
touching the hub we check in a few seconds whether it is reachable at all; if not, the hub client
is switched to offline mode so only the local cache is tried, and a miss becomes one clear line.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
from torch import nn

from . import demo
from .errors import TpoolError

DEFAULT_MODEL = "deit_small_patch16_224"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HUB_PROBE_TIMEOUT_S = 3.0

# Models whose weights ship inside a package: name -> function returning the weights file.
SHIPPED_WEIGHTS: dict[str, Callable[[], Path]] = {demo.DEMO_MODEL: demo.shipped_weights}


@dataclass(frozen=True)
class Workload:
    """The model and data a command runs on, after the built-in demo defaults are filled in."""

    model: str
    data: Path
    class_map: Optional[Path]
    demo: bool
    announcement: Optional[str] = None  # what the user should be told (the demo, and how to leave it)


def resolve_workload(model: Optional[str], data: Optional[str | Path], class_map: Optional[str | Path], command: str) -> Workload:
    """Fill in the built-in demo where the user gave no ``--data``.

    No ``--model`` and no ``--data`` (or ``--model tpool_digits_vit`` alone): the demo model on its
    digits test folder, with an ``announcement`` of it and of how to point ``tpool COMMAND`` at
    ImageNet. ``--data`` without ``--model``: the default timm model. ``--model`` other than the
    demo without ``--data``: one clear error, since the demo images mean nothing to another model.
    """
    if data is None:
        if class_map is not None:
            raise TpoolError("--class-map goes with --data: the built-in demo brings its own class map")
        if model not in (None, demo.DEMO_MODEL):
            raise TpoolError(f"--data DIR is required for {model} (an ImageNet-style folder DIR/<wnid>/<image>); "
                             f"the built-in demo data goes with --model {demo.DEMO_MODEL}")
        data_ = demo.ensure_demo_data()
        note = (
            f"{demo.DEMO_MODEL} (a ViT trained on scikit-learn's digits, shipped with tpool) on its "
            f"{data_.num_images} test images in {data_.root}. For ImageNet: tpool {command} --model deit_small_patch16_224 "
            "--weights W.safetensors --data /path/to/imagenet/val"
        )
        return Workload(demo.DEMO_MODEL, data_.root, data_.class_map, True, note)
    root = Path(data).expanduser()
    return Workload(model or DEFAULT_MODEL, root, Path(class_map).expanduser() if class_map is not None else None, False)


@dataclass
class LoadedModel:
    """A model ready to run, with where its weights came from (for result rows)."""

    model: nn.Module
    name: str
    weights: str  # file path, 'shipped:<path>', 'pretrained (timm cache/hub)' or 'random-init'
    weights_sha256: Optional[str]
    pretrained: bool


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Content hash of a weights file, so results record exactly which weights produced them."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    family = sorted(set(timm.list_models("*vit*") + timm.list_models("*deit*")))
    close = [m for m in family if m.startswith(name)][:3] or difflib.get_close_matches(name, family, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `timm.list_models('*vit*')`"
    raise TpoolError(f"unknown model {name!r}{hint}")


def _hub_reachable() -> bool:
    """Whether the Hugging Face hub answers at all, decided in seconds (no retries)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _go_offline() -> None:
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"


def load_model(
    name: str = DEFAULT_MODEL,
    weights: Optional[str | Path] = None,
    random_init: bool = False,
    img_size: Optional[int] = None,
    device: str | torch.device = "cpu",
    seed: Optional[int] = None,
) -> LoadedModel:
    """Create ``name`` in eval mode on ``device`` with weights resolved as the module docstring says.

    ``seed`` with ``random_init``: the random weights are drawn after ``torch.manual_seed(seed)``,
    so every run gets the same ones, and ``weights`` says so ("random-init (seed N)"): another
    seed, other weights, another result identity.
    """
    _check_model_name(name)
    if random_init and seed is not None:
        torch.manual_seed(seed)
    kwargs: dict[str, object] = {}
    if img_size is not None:
        kwargs["img_size"] = img_size
    sha = None
    if weights is not None and random_init:
        raise TpoolError("--weights and --random-init exclude each other")
    if weights is None and not random_init and name in SHIPPED_WEIGHTS:
        weights = SHIPPED_WEIGHTS[name]()
    try:
        if random_init:
            model = timm.create_model(name, pretrained=False, **kwargs)
            source = "random-init"
        elif weights is not None:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise TpoolError(f"weights file not found: {path}")
            if path.suffix not in WEIGHT_SUFFIXES:
                raise TpoolError(f"weights must be one of {', '.join(WEIGHT_SUFFIXES)} files, got {path.name}")
            sha = file_sha256(path)
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
            source = str(path)
        else:
            if not _hub_reachable():
                _go_offline()
            try:
                model = timm.create_model(name, pretrained=True, **kwargs)
            except Exception as exc:  # any failure to find weights is the user's to fix
                raise TpoolError(
                    f"no pretrained weights for {name} in the local cache and the hub is unreachable "
                    f"({type(exc).__name__}); pass --weights PATH (a .safetensors or .pth file)"
                ) from None
            source = "pretrained (timm cache/hub)"
    except TpoolError:
        raise
    except Exception as exc:  # a corrupt or foreign checkpoint, a bad img_size: the user's input
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        reason = " ".join(lines[:2])[:300] if lines else type(exc).__name__
        what = f"weights {weights}" if weights is not None else ("random init" if random_init else "pretrained weights")
        raise TpoolError(f"could not build {name} with {what}: {reason}") from None
    from .patch import check_supported

    check_supported(model)
    model.eval().to(device)
    if random_init and seed is not None:
        source = f"random-init (seed {seed})"
    return LoadedModel(model=model, name=name, weights=source, weights_sha256=sha, pretrained=not random_init)
