"""The built-in demo: a small ViT trained on scikit-learn's handwritten digits, shipped with the package.

No ImageNet weights or images can be fetched on many machines, so the package carries one small,
real case end to end:

* ``tpool_digits_vit``, a timm :class:`~timm.models.vision_transformer.VisionTransformer`
  (32 px input, patch 4 -> 8x8 = 64 patch tokens + a class token, width 96, depth 6, 3 heads,
  10 classes), registered with timm on import of this module (which :mod:`tpool_cli.models`
  imports, so every name it resolves can be the demo's) so that ``timm.create_model``,
  ``resolve_data_config`` and ``create_transform`` treat it like any other timm model;
* its weights (``assets/tpool_digits_vit.safetensors``) and training record
  (``assets/tpool_digits_vit.json``), made by ``scripts/train_demo.py``;
* the held-out test split (``assets/digits_test.safetensors``: 360 raw 8x8 digits scaled to
  0..255, their labels and their indices in ``load_digits()``). Shipping the split, rather than
  re-deriving it with scikit-learn at run time, keeps scikit-learn out of the runtime
  dependencies and makes the split immune to library versions.

:func:`ensure_demo_data` writes the test split once as an ordinary image folder
(``<cache>/digits-test/<class>/<n>.png`` + ``classes.txt``), so the demo runs through exactly the
same image-folder + timm-transform path as ImageNet. The PNGs hold the raw 8x8 pixels; the model's
own timm eval transform (bilinear resize to 32 px, crop_pct 1.0, normalise) does the upsampling,
and the training script fed the model through that very transform (:func:`digits_to_tensors`),
so evaluating the folder reproduces the recorded test accuracy exactly.

Importing this module is cheap beyond timm itself: PIL, safetensors and numpy are imported only
by the functions that need them, and nothing is read or written at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .errors import TpoolError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from PIL import Image

__all__ = [
    "DEMO_MODEL",
    "DemoData",
    "cache_dir",
    "demo_images",
    "digits_to_pil",
    "digits_to_tensors",
    "ensure_demo_data",
    "load_test_split",
    "shipped_record",
    "shipped_weights",
]

DEMO_MODEL = "tpool_digits_vit"
ASSETS = Path(__file__).resolve().parent / "assets"
WEIGHTS_FILE = ASSETS / f"{DEMO_MODEL}.safetensors"
RECORD_FILE = ASSETS / f"{DEMO_MODEL}.json"
TEST_SPLIT_FILE = ASSETS / "digits_test.safetensors"
TRAIN_SPLIT_FILE = ASSETS / "digits_train.safetensors"  # for `tpool finetune` on the demo
SPLIT_FILES = {"test": TEST_SPLIT_FILE, "train": TRAIN_SPLIT_FILE}
DATA_DIRNAME = "digits-test"
CLASS_MAP_NAME = "classes.txt"
STAMP_NAME = ".source-sha256"  # sha256 of the shipped split the folder was written from
NUM_CLASSES = 10

# Pixel statistics of the training split after the eval transform (before normalisation), rounded;
# the digits are grey, so the three channels share them.
DIGITS_MEAN = (0.3057, 0.3057, 0.3057)
DIGITS_STD = (0.3235, 0.3235, 0.3235)

ARCH = dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3, mlp_ratio=4.0, num_classes=NUM_CLASSES)

# Read by timm's register_model (it looks up ``default_cfgs`` in the entrypoint's module).
default_cfgs = generate_default_cfgs(
    {
        DEMO_MODEL: dict(
            file=str(WEIGHTS_FILE),  # so timm.create_model(DEMO_MODEL, pretrained=True) works offline too
            num_classes=NUM_CLASSES,
            input_size=(3, 32, 32),
            fixed_input_size=True,
            pool_size=None,
            crop_pct=1.0,
            crop_mode="center",
            interpolation="bilinear",
            mean=DIGITS_MEAN,
            std=DIGITS_STD,
            first_conv="patch_embed.proj",
            classifier="head",
            license="mit",
            description="tpool built-in demo: ViT (patch 4, width 96, depth 6) trained on scikit-learn digits",
        )
    }
)


@register_model
def tpool_digits_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """The demo ViT: 32 px, patch 4 (64 patch tokens), class token, width 96, depth 6, 3 heads."""
    return build_model_with_cfg(
        VisionTransformer,
        DEMO_MODEL,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **{**ARCH, **kwargs},
    )


@dataclass(frozen=True)
class DemoData:
    """Where the demo test split lies as an image folder, in the form ``tpool evaluate`` reads."""

    root: Path  # <cache>/digits-test, one folder per class (0..9)
    class_map: Path  # root/classes.txt: line i = folder name of class index i
    num_images: int


def shipped_weights() -> Path:
    """The demo model's weights file inside the package."""
    return WEIGHTS_FILE


def shipped_record() -> dict[str, Any]:
    """The training record written by ``scripts/train_demo.py`` (seed, split, time, test top-1...)."""
    try:
        return json.loads(RECORD_FILE.read_text())
    except OSError:
        raise TpoolError(f"the demo's training record is missing ({RECORD_FILE}); reinstall tpool") from None


def cache_dir() -> Path:
    """``$TPOOL_CACHE_DIR``, else ``$XDG_CACHE_HOME/tpool``, else ``~/.cache/tpool``."""
    if os.environ.get("TPOOL_CACHE_DIR"):
        return Path(os.environ["TPOOL_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tpool"


def load_test_split() -> tuple["np.ndarray", "np.ndarray"]:
    """The shipped test split: images (N x 8 x 8 uint8, 0..255) and labels (N int64)."""
    return load_split("test")


def load_split(split: str = "test") -> tuple["np.ndarray", "np.ndarray"]:
    """A shipped split ("test": 360 digits, "train": the 1,437 the demo model was trained on)."""
    from safetensors.numpy import load_file

    path = _split_file(split)
    try:
        arrays = load_file(str(path))
    except OSError:
        raise TpoolError(f"the demo's {split} split is missing ({path}); reinstall tpool") from None
    return arrays["images"], arrays["labels"]


def _split_file(split: str) -> Path:
    if split not in SPLIT_FILES:
        raise TpoolError(f"the demo has the splits {', '.join(SPLIT_FILES)}, not {split!r}")
    return SPLIT_FILES[split]


def digits_to_pil(image: "np.ndarray") -> "Image.Image":
    """One raw 8x8 uint8 digit as a greyscale PIL image (what the PNGs hold)."""
    from PIL import Image

    if image.dtype.name != "uint8" or image.ndim != 2:
        raise TpoolError(f"a digit must be a 2-D uint8 array, got {image.dtype.name} of shape {image.shape}")
    return Image.fromarray(image)  # a 2-D uint8 array becomes mode "L"


def digits_to_tensors(images: "np.ndarray", transform: Callable[["Image.Image"], "torch.Tensor"]) -> "torch.Tensor":
    """Images (N x 8 x 8 uint8) -> model inputs (N x 3 x 32 x 32), exactly as an image folder gives them.

    Each digit goes the way a PNG of it would: greyscale PIL image, ``.convert("RGB")``, then the
    model's timm eval ``transform``. The training script uses this, so train and folder agree bit for bit.
    """
    import torch

    return torch.stack([transform(digits_to_pil(image).convert("RGB")) for image in images])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _image_name(index: int) -> str:
    return f"{index:03d}.png"


def _is_complete(root: Path, stamp: str, num_images: int) -> bool:
    try:
        if (root / STAMP_NAME).read_text().strip() != stamp:
            return False
        names = (root / CLASS_MAP_NAME).read_text().split()
    except OSError:
        return False
    if names != [str(c) for c in range(NUM_CLASSES)]:
        return False
    return sum(1 for _ in root.glob("*/*.png")) == num_images


def _write_folder(target: Path, images: "np.ndarray", labels: "np.ndarray", stamp: str) -> None:
    for c in range(NUM_CLASSES):
        (target / str(c)).mkdir()
    for index, (image, label) in enumerate(zip(images, labels)):
        digits_to_pil(image).save(target / str(int(label)) / _image_name(index), format="PNG")
    (target / CLASS_MAP_NAME).write_text("".join(f"{c}\n" for c in range(NUM_CLASSES)))
    (target / STAMP_NAME).write_text(stamp + "\n")


def ensure_demo_data(cache: Optional[Path] = None, split: str = "test") -> DemoData:
    """Write a demo split (the test split by default) as an image folder in the cache once; return where it is.

    Idempotent: a complete folder written from the same shipped split is reused untouched. The
    folder is written into a temporary sibling and renamed into place, so an interrupted write
    never leaves a half folder, and two processes racing both end up with one complete folder.
    A folder that is incomplete or from another split is replaced the same way.
    """
    images, labels = load_split(split)
    stamp = _sha256(_split_file(split))
    base = Path(cache) if cache is not None else cache_dir()
    root = base / (DATA_DIRNAME if split == "test" else f"digits-{split}")
    data = DemoData(root=root, class_map=root / CLASS_MAP_NAME, num_images=len(images))
    if _is_complete(root, stamp, len(images)):
        return data
    try:
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{DATA_DIRNAME}-", dir=base))
    except OSError as exc:
        raise TpoolError(f"cannot write the demo data to {base} ({exc.strerror}); set TPOOL_CACHE_DIR to a writable folder") from None
    stale: Optional[Path] = None
    try:
        _write_folder(tmp, images, labels, stamp)
        if root.exists() and not _is_complete(root, stamp, len(images)):
            stale = Path(tempfile.mkdtemp(prefix=f".{DATA_DIRNAME}-stale-", dir=base))
            os.replace(root, stale / DATA_DIRNAME)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_complete(root, stamp, len(images)):  # not a concurrent writer that won the race
                raise
    except OSError as exc:
        raise TpoolError(f"cannot write the demo data to {root} ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    return data


def demo_images(n: int) -> list[Path]:
    """The first ``n`` test images (in split order, all of them if ``n`` exceeds the split), for pictures."""
    if n < 0:
        raise TpoolError(f"number of demo images must be >= 0, got {n}")
    data = ensure_demo_data()
    _, labels = load_test_split()
    return [data.root / str(int(label)) / _image_name(i) for i, label in enumerate(labels[:n])]


# The demo sweep goes further down than ImageNet defaults: 64 tokens leave room to the end.
DEMO_KEEPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
