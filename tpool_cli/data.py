"""ImageNet-style image folders: scan, label, preprocess, and decode once.

A folder is ``DIR/<class>/<image>``. Class folders are mapped to the model's class indices through
a label space, never by sorting the folders that happen to exist: by default the ImageNet-1k
synset list that timm ships (``n01440764`` -> 0, ...), so a subset of ImageNet val (10 classes,
or 1) is scored against the 1000-way head correctly; or a ``--class-map`` file (line i = the
folder name of class i) for other label spaces.

Preprocessing comes from the model's own pretrained config through timm (resize, crop_pct,
interpolation, mean, std), split in two halves so that every path computes exactly the same
input: decoding + resize + crop on the CPU yield a **uint8** tensor (timm's prefetcher form), and
normalisation ``(x / 255 - mean) / std`` happens on the device (:func:`normalize`). The
per-point folder loader (:func:`folder_loader`) and the decode-once cache of a sweep
(:func:`decode_once`) share that first half, so their predictions are identical.

Files that cannot be decoded are skipped and reported (path and reason), never a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .errors import TpoolError
from .store import write_text

# Suffixes decoded as images; any other (non-hidden) file in a class folder is reported as skipped.
IMAGE_SUFFIXES = frozenset(
    ".jpg .jpeg .jpe .jfif .png .bmp .gif .webp .tif .tiff .ppm .pgm .pbm .pnm .tga".split()
)
IMAGENET_LABEL_SPACE = "imagenet-1k synsets (timm)"
MEMORY_FRACTION = 0.5  # decode cache stays in RAM when it needs at most this share of available memory

ProgressFn = Callable[[int], None]  # called with the number of files just processed


@dataclass(frozen=True)
class Sample:
    """One file of the folder: where it is and the class index its folder maps to."""

    path: Path
    rel: str  # path relative to the folder root, POSIX separators (results and fingerprints use it)
    label: int


@dataclass
class ImageFolder:
    """A scanned folder: its files in sorted order with their class indices."""

    root: Path
    samples: list[Sample]
    label_space: str  # IMAGENET_LABEL_SPACE or 'class map <file>'
    classes: dict[str, int]  # class folders present -> class index
    total_files: int  # files found before --limit
    limit: Optional[int] = None
    class_map: Optional[Path] = None
    shard: Optional[tuple[int, int]] = None  # (rank, world size) when this is one rank's share (distributed.shard)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def max_label(self) -> int:
        return max((s.label for s in self.samples), default=-1)


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k wnids in class-index order, as timm ships them."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def read_class_map(path: Path) -> list[str]:
    """Class folder names from a file, one per line; line i (0-based) is class index i."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TpoolError(f"class map not found: {path}")
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise TpoolError(f"cannot read class map {path}: {exc}") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise TpoolError(f"class map {path} is empty")
    blank = [i + 1 for i, name in enumerate(lines) if not name]
    if blank:
        raise TpoolError(f"class map {path}: line {blank[0]} is empty (line i names class index i)")
    seen: dict[str, int] = {}
    for i, name in enumerate(lines):
        if name in seen:
            raise TpoolError(f"class map {path}: {name!r} appears on lines {seen[name] + 1} and {i + 1}")
        seen[name] = i
    return lines


def _visible(entry: os.DirEntry | Path) -> bool:
    return not entry.name.startswith(".")


def _files_under(folder: Path) -> list[Path]:
    """Non-hidden regular files under a class folder (recursively), in no particular order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / name for name in filenames if not name.startswith(".")]
    return found


def scan_folder(root: str | Path, class_map: Optional[str | Path] = None, limit: Optional[int] = None) -> ImageFolder:
    """List ``root/<class>/<file>`` in sorted order with class indices; clear errors for bad folders.

    ``limit`` keeps the first N files of the sorted list (files that later fail to decode count).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise TpoolError(f"data folder not found: {root}")
    if not root.is_dir():
        raise TpoolError(f"--data must be a folder (DIR/<class>/<image>), got a file: {root}")
    if limit is not None and limit < 1:
        raise TpoolError(f"--limit must be >= 1, got {limit}")
    try:
        class_dirs = sorted((Path(e.path) for e in os.scandir(root) if e.is_dir() and _visible(e)), key=lambda p: p.name)
        loose = [e.name for e in os.scandir(root) if e.is_file() and _visible(e)]
    except OSError as exc:
        raise TpoolError(f"cannot read data folder {root}: {exc.strerror or exc}") from None

    if class_map is not None:
        names = read_class_map(Path(class_map))
        label_space = f"class map {Path(class_map).name}"
        hint = f"they are not in the class map {class_map}"
    else:
        names = imagenet_synsets()
        label_space = IMAGENET_LABEL_SPACE
        hint = "they are not ImageNet-1k synsets (wnids like n01440764); pass --class-map FILE for another label space"
    index = {name: i for i, name in enumerate(names)}

    unknown = [d.name for d in class_dirs if d.name not in index]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise TpoolError(f"{len(unknown)} class folder(s) under {root} have unknown names ({shown}): {hint}")

    samples = []
    for folder in class_dirs:
        label = index[folder.name]
        for path in _files_under(folder):
            samples.append(Sample(path=path, rel=path.relative_to(root).as_posix(), label=label))
    if not samples:
        where = f"; found {len(loose)} file(s) directly in it" if loose else ""
        raise TpoolError(f"no images under {root}: expected DIR/<class>/<image>{where}")
    samples.sort(key=lambda s: s.rel)
    total = len(samples)
    if limit is not None:
        samples = samples[:limit]
    return ImageFolder(
        root=root,
        samples=samples,
        label_space=label_space,
        classes={d.name: index[d.name] for d in class_dirs},
        total_files=total,
        limit=limit,
        class_map=Path(class_map) if class_map is not None else None,
    )


# ---------------------------------------------------------------------------------------------
# Preprocessing


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm's eval preprocessing for ``model``, at the resolution the model was built for.

    ``resolve_data_config`` reads the pretrained config, whose ``input_size`` stays at the
    pretrained resolution when the model is built with another ``img_size``; the model's patch
    embedding knows the real one.
    """
    from timm.data import resolve_data_config

    cfg = dict(resolve_data_config(model=model))
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        cfg["input_size"] = (cfg["input_size"][0], int(size[0]), int(size[1]))
    return {
        "input_size": tuple(int(v) for v in cfg["input_size"]),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "crop_pct": float(cfg["crop_pct"]) if cfg.get("crop_pct") is not None else None,
        "crop_mode": cfg.get("crop_mode", "center"),
        "mean": tuple(float(v) for v in cfg["mean"]),
        "std": tuple(float(v) for v in cfg["std"]),
    }


class Decoder:
    """File -> uint8 C x H x W tensor: decode, convert to RGB, resize and crop (timm's eval transform
    without its normalisation, which :func:`normalize` applies on the device). Picklable for workers."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from timm.data import create_transform

        self.cfg = cfg
        self.transform = create_transform(
            input_size=cfg["input_size"],
            is_training=False,
            interpolation=cfg["interpolation"],
            mean=cfg["mean"],
            std=cfg["std"],
            crop_pct=cfg["crop_pct"],
            crop_mode=cfg["crop_mode"],
            use_prefetcher=True,  # stop before ToTensor/Normalize: uint8 out
        )

    def __call__(self, path: Path) -> torch.Tensor:
        """Decode one file; raises ValueError with a short reason when it is not a readable image."""
        from PIL import Image, UnidentifiedImageError

        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError("not an image file")
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")  # forces the full decode: truncated files fail here
            out = self.transform(img)
        except UnidentifiedImageError:
            raise ValueError("cannot identify image file") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ValueError(f"cannot decode: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}") from None
        out = torch.as_tensor(np.asarray(out)) if not isinstance(out, torch.Tensor) else out
        if out.dtype != torch.uint8 or out.shape != (3, *self.cfg["input_size"][1:]):
            raise ValueError(f"unexpected decoded shape {tuple(out.shape)} / dtype {out.dtype}")
        return out


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 B x 3 x H x W on any device -> float32 normalised, exactly as ToTensor + Normalize."""
    m = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1)
    return images.float().div_(255.0).sub_(m).div_(s)


# ---------------------------------------------------------------------------------------------
# A few image files (visualize, recon): same decode and normalisation as evaluation


def check_image_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Paths that exist and are files; the first that is not is one TpoolError (before any model loads)."""
    checked = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise TpoolError(f"image not found: {path}")
        if not path.is_file():
            raise TpoolError(f"not an image file: {path} is a directory")
        checked.append(path)
    return checked


def images_in_folder(folder: str | Path, limit: Optional[int] = None) -> list[Path]:
    """Image files under ``folder`` at any depth, in sorted relative-path order, at most ``limit``."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise TpoolError(f"image folder not found: {root}")
    paths = sorted((p for p in _files_under(root) if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.relative_to(root).as_posix())
    if not paths:
        raise TpoolError(f"no image files under {root}")
    return paths[:limit] if limit is not None else paths


def load_images(paths: Sequence[str | Path], model: nn.Module) -> tuple[torch.Tensor, dict[str, Any]]:
    """Decode and normalise image files for ``model`` exactly as `tpool evaluate` does.

    Returns (float32 B x 3 x H x W, the data config). A file that does not decode is one TpoolError.
    """
    cfg = data_config(model)
    decoder = Decoder(cfg)
    decoded = []
    for path in check_image_paths(paths):
        try:
            decoded.append(decoder(path))
        except ValueError as exc:
            reason = "not an image file" if str(exc) in ("not an image file", "cannot identify image file") else str(exc)
            raise TpoolError(f"{reason}: {path}") from None
    if not decoded:
        raise TpoolError("give at least one image")
    return normalize(torch.stack(decoded), cfg["mean"], cfg["std"]), cfg


# ---------------------------------------------------------------------------------------------
# Loading per batch (the uncached path)


class _FolderDataset(torch.utils.data.Dataset):
    """Item i -> (uint8 image or None, i, reason or None); decoding errors never raise."""

    def __init__(self, samples: Sequence[Sample], decoder: Decoder) -> None:
        self.paths = [s.path for s in samples]
        self.decoder = decoder

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Optional[torch.Tensor], int, Optional[str]]:
        try:
            return self.decoder(self.paths[i]), i, None
        except ValueError as exc:
            return None, i, str(exc)


def _collate(items: list[tuple[Optional[torch.Tensor], int, Optional[str]]]):
    """(uint8 batch or None, sample indices of the batch, [(index, reason)] of skipped files)."""
    good = [(img, i) for img, i, _ in items if img is not None]
    skipped = [(i, reason) for img, i, reason in items if img is None]
    images = torch.stack([img for img, _ in good]) if good else None
    return images, torch.tensor([i for _, i in good], dtype=torch.long), skipped


def default_workers() -> int:
    """DataLoader workers: the CPUs this process may use, at most 8 (decoding saturates beyond)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus))


def folder_loader(folder: ImageFolder, decoder: Decoder, batch_size: int, workers: Optional[int] = None, pin_memory: bool = False):
    """Batches of ``(uint8 images, sample indices, skipped)`` in sorted sample order."""
    workers = default_workers() if workers is None else workers
    return torch.utils.data.DataLoader(
        _FolderDataset(folder.samples, decoder),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


# ---------------------------------------------------------------------------------------------
# Decode once (the cached path of a sweep)


def fingerprint(folder: ImageFolder, cfg: dict[str, Any]) -> str:
    """What results depend on in the data: every file (relative path, size, mtime), its class index,
    and the preprocessing. Equal fingerprints mean equal inputs to the model."""
    digest = hashlib.sha256()
    digest.update(json.dumps({k: cfg[k] for k in sorted(cfg)}, sort_keys=True).encode())
    for s in folder.samples:
        try:
            st = s.path.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        digest.update(f"{s.rel}\0{size}\0{mtime}\0{s.label}\n".encode())
    return digest.hexdigest()[:16]


@dataclass
class DecodedImages:
    """A folder decoded once: uint8 images (RAM, a memory-mapped file, or already on a device)."""

    images: torch.Tensor  # M x 3 x H x W uint8
    labels: torch.Tensor  # M long
    sample_indices: torch.Tensor  # M long: index into folder.samples of each decoded image
    skipped: list[dict[str, str]]  # {"path": rel, "reason": ...}
    folder: ImageFolder
    cfg: dict[str, Any]
    fingerprint: str
    storage: str = "memory"  # 'memory', 'mmap:<file>' or a device name
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def nbytes(self) -> int:
        return self.images.numel()

    def to(self, device: torch.device, headroom: float = 0.6) -> "DecodedImages":
        """Move the cache onto ``device`` when it fits in ``headroom`` of the free memory there;
        otherwise keep it on the host (batches are then copied per step)."""
        device = torch.device(device)
        if device.type == "cpu" or self.images.device == device:
            return self
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if self.nbytes > headroom * free:
                return self
        return DecodedImages(
            images=self.images.to(device),
            labels=self.labels.to(device),
            sample_indices=self.sample_indices,
            skipped=self.skipped,
            folder=self.folder,
            cfg=self.cfg,
            fingerprint=self.fingerprint,
            storage=str(device),
            meta=self.meta,
        )


def available_memory() -> int:
    """Bytes of memory available to allocate (MemAvailable on Linux; free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def decode_once(
    folder: ImageFolder,
    cfg: dict[str, Any],
    *,
    batch_size: int = 64,
    workers: Optional[int] = None,
    cache_dir: Optional[Path] = None,
    storage: str = "auto",
    progress: Optional[ProgressFn] = None,
) -> DecodedImages:
    """Decode and preprocess every file of ``folder`` once into a uint8 tensor.

    ``storage``: 'memory', 'disk' (a memory-mapped file under ``cache_dir``), or 'auto' (memory when
    the tensor needs at most half the available memory). A complete disk cache with the same
    fingerprint is reused instead of decoding again (a resumed sweep starts at once).
    """
    if storage not in ("auto", "memory", "disk"):
        raise TpoolError(f"unknown cache storage {storage!r}; choose auto, memory or disk")
    fp = fingerprint(folder, cfg)
    c, h, w = cfg["input_size"]
    n = len(folder)
    nbytes = n * c * h * w
    if storage == "auto":
        storage = "memory" if nbytes <= MEMORY_FRACTION * available_memory() else "disk"
    if storage == "disk":
        if cache_dir is None:
            raise TpoolError("a disk decode cache needs a folder (--out)")
        cached = _open_disk_cache(folder, cfg, fp, Path(cache_dir))
        if cached is not None:
            if progress is not None:
                progress(n)
            return cached
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tmp_path = Path(cache_dir) / f"{fp}.tmp.npy"
        array = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.uint8, shape=(n, c, h, w))
        images = torch.from_numpy(array)
    else:
        images = torch.empty((n, c, h, w), dtype=torch.uint8)

    labels_all = torch.tensor([s.label for s in folder.samples], dtype=torch.long)
    kept: list[torch.Tensor] = []
    skipped: list[dict[str, str]] = []
    filled = 0
    for batch, indices, bad in folder_loader(folder, Decoder(cfg), batch_size, workers):
        if batch is not None:
            images[filled : filled + batch.shape[0]] = batch
            filled += batch.shape[0]
            kept.append(indices)
        skipped += [{"path": folder.samples[i].rel, "reason": reason} for i, reason in bad]
        if progress is not None:
            progress(len(indices) + len(bad))
    sample_indices = torch.cat(kept) if kept else torch.empty(0, dtype=torch.long)
    if storage == "disk":
        # data first, then the meta file that marks it complete: a killed decode leaves no valid cache
        array.flush()
        del images, array
        tmp_path.replace(Path(cache_dir) / f"{fp}.npy")
        meta = {"fingerprint": fp, "shape": [filled, c, h, w], "skipped": skipped, "sample_indices": sample_indices.tolist()}
        write_text(Path(cache_dir) / f"{fp}.json", json.dumps(meta))
        return _open_disk_cache(folder, cfg, fp, Path(cache_dir))  # type: ignore[return-value]
    return DecodedImages(
        images=images[:filled],
        labels=labels_all[sample_indices],
        sample_indices=sample_indices,
        skipped=skipped,
        folder=folder,
        cfg=cfg,
        fingerprint=fp,
        storage="memory",
        meta={"shape": [filled, c, h, w]},
    )


def _open_disk_cache(folder: ImageFolder, cfg: dict[str, Any], fp: str, cache_dir: Path) -> Optional[DecodedImages]:
    """A complete memory-mapped cache for fingerprint ``fp``, or None when there is none."""
    meta_path = cache_dir / f"{fp}.json"
    data_path = cache_dir / f"{fp}.npy"
    if not meta_path.is_file() or not data_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        array = np.load(data_path, mmap_mode="c")
    except (OSError, ValueError):
        return None
    filled = meta["shape"][0]
    if meta.get("fingerprint") != fp or array.shape[1:] != tuple(meta["shape"][1:]) or array.shape[0] < filled:
        return None
    sample_indices = torch.tensor(meta["sample_indices"], dtype=torch.long)
    labels_all = torch.tensor([s.label for s in folder.samples], dtype=torch.long)
    return DecodedImages(
        images=torch.from_numpy(array[:filled]),
        labels=labels_all[sample_indices],
        sample_indices=sample_indices,
        skipped=meta["skipped"],
        folder=folder,
        cfg=cfg,
        fingerprint=fp,
        storage=f"mmap:{data_path}",
        meta=meta,
    )
