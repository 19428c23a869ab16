"""Builders for the image folders and checkpoints the evaluation tests run on (no downloads).

Real photos come from foolbox's 20 ImageNet images (file names carry their class index);
checkpoints are made here and saved as safetensors, so `--weights` loading is exercised end to end.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import ImageNetInfo

CKPT_MODEL = "vit_tiny_patch16_224"  # 1000-way head; built at a small img_size to stay fast


def synsets() -> list[str]:
    return list(ImageNetInfo().label_names())


def foolbox_images() -> list[tuple[Path, int]]:
    """The 20 real ImageNet photos foolbox ships, with their class index (skip when not installed)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or spec.origin is None:
        pytest.skip("foolbox is not installed (pip install --no-deps foolbox): its ImageNet photos are the test images")
    folder = Path(spec.origin).parent / "data"
    found = [(p, int(p.stem.split("_")[2])) for p in sorted(folder.glob("imagenet_*_*.jpg"))]
    assert len(found) == 20, f"expected foolbox's 20 ImageNet photos in {folder}"
    return found


def imagenet_folder(root: Path, labels: Optional[set[int]] = None) -> Path:
    """``root/<wnid>/<photo>`` from foolbox's photos (only those whose class is in ``labels``)."""
    wnids = synsets()
    for path, label in foolbox_images():
        if labels is None or label in labels:
            target = root / wnids[label]
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target / path.name)
    return root


def photos_as(root: Path, folder_name: str, count: int = 3) -> Path:
    """``count`` foolbox photos copied into ``root/<folder_name>/`` (whatever their true class)."""
    target = root / folder_name
    target.mkdir(parents=True, exist_ok=True)
    for path, _ in foolbox_images()[:count]:
        shutil.copy(path, target / path.name)
    return root


def noise_images(folder: Path, count: int, size: int = 48, seed: int = 0, suffix: str = ".jpg") -> list[Path]:
    """Random RGB images written as real image files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=(size, size + 7 * (i % 3), 3), dtype=np.uint8)
        path = folder / f"img_{i:03d}{suffix}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def constant_checkpoint(path: Path, cls: int, img_size: int = 32) -> Path:
    """A ViT whose head always predicts ``cls`` (zero weights, one-hot bias), saved as safetensors."""
    torch.manual_seed(0)
    model = timm.create_model(CKPT_MODEL, pretrained=False, img_size=img_size)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[cls] = 10.0
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def random_checkpoint(path: Path, img_size: int = 64, seed: int = 0, classes: Optional[int] = None) -> Path:
    """A randomly initialised ViT (seeded), saved as safetensors: predictions vary with the operator.

    ``classes``: only the first ``classes`` outputs of the 1000-way head can win (the others get a
    large negative bias), so on a ``classes``-way folder accuracy is chance-level, not zero."""
    torch.manual_seed(seed)
    model = timm.create_model(CKPT_MODEL, pretrained=False, img_size=img_size)
    if classes is not None:
        with torch.no_grad():
            model.head.weight[classes:].zero_()
            model.head.bias[classes:] = -100.0
            model.head.weight[:classes] *= 50.0  # spread the logits so operators change predictions
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def small_label_space(root: Path, classes: int = 10) -> tuple[Path, Path]:
    """foolbox's 20 photos spread over folders ``c0``..``c{classes-1}`` plus their class map."""
    for i, (path, _) in enumerate(foolbox_images()):
        target = root / "data" / f"c{i % classes}"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    class_map = root / "classes.txt"
    class_map.write_text("".join(f"c{i}\n" for i in range(classes)))
    return root / "data", class_map
