"""Decode once vs. decode per point: `tpool pareto`'s cached sweep against the naive loop.

Generates (or reuses) an ImageNet-style folder of JPEGs, then times on the same model and points:

* cached: :func:`tpool_cli.sweep.run_sweep` (decode + preprocess once into a uint8 tensor, moved to
  the device, every point from there);
* naive: for each point, :func:`tpool_cli.evaluate.evaluate` on the folder (DataLoader workers
  decode every image again).

Both count GMACs per point with fvcore. Prints both wall times and their ratio (one run, same
process), and checks that both give the same top-1 for every point.

    python benchmarks/sweep.py                                   # CPU: tiny model, small folder
    python benchmarks/sweep.py --model deit_small_patch16_224 --img-size 224 --images 5000 --batch-size 256
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _write_image(args: tuple[Path, int, int, int]) -> None:
    from PIL import Image

    path, seed, width, height = args
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
    noise = rng.integers(-12, 13, size=(height, width, 3))
    pixels = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_folder(root: Path, images: int, classes: int = 10, width: int = 500, height: int = 375) -> Path:
    """``root/<wnid>/<n>.JPEG``: smooth random photos of ImageNet's typical size (JPEG decode cost)."""
    from timm.data import ImageNetInfo

    wnids = ImageNetInfo().label_names()
    jobs = []
    for i in range(images):
        folder = root / wnids[(i % classes) * 7]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:06d}.JPEG"
        if not path.exists():
            jobs.append((path, i, width, height))
    if jobs:
        with multiprocessing.Pool(os.cpu_count()) as pool:
            pool.map(_write_image, jobs, chunksize=32)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--data", type=Path, help="reuse/create the folder here (default: a temp folder)")
    parser.add_argument("--ops", default="topk,grid,random")
    parser.add_argument("--keep", default="0.9,0.7,0.5")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()

    from tpool_cli.device import resolve_device
    from tpool_cli.evaluate import evaluate
    from tpool_cli.models import load_model
    from tpool_cli.sweep import plan_points, run_sweep

    tmp = tempfile.TemporaryDirectory()
    data = args.data or Path(tmp.name) / "val"
    t0 = time.perf_counter()
    make_folder(data, args.images)
    print(f"folder: {data} ({args.images} JPEGs 500x375, made/checked in {time.perf_counter() - t0:.1f} s)")

    device = resolve_device(args.device)
    torch.manual_seed(0)
    loaded = load_model(args.model, random_init=True, img_size=args.img_size)
    points = plan_points(args.ops.split(","), [float(k) for k in args.keep.split(",")])
    common = dict(device=device, amp=args.amp, batch_size=args.batch_size, workers=args.workers)
    print(f"{args.model} @ {args.img_size}px on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{len(points)} points, batch {args.batch_size}")

    if device.type == "cuda":  # one warm-up so neither side pays CUDA/cuBLAS initialisation
        evaluate(loaded, data, limit=args.batch_size, count=False, **common)

    t0 = time.perf_counter()
    cached = run_sweep(loaded, data, points, Path(tmp.name) / "out", resume=False, **common)
    t_cached = time.perf_counter() - t0

    t0 = time.perf_counter()
    naive = []
    for point in points:
        point.apply(loaded.model)
        naive.append(evaluate(loaded, data, **common))
    t_naive = time.perf_counter() - t0

    same = all(r["correct1"] == n.correct1 and r["images"] == n.images for r, n in zip(cached.rows, naive))
    print(f"cached sweep : {t_cached:7.2f} s  (decode once {cached.decode_seconds:.2f} s, cache in {cached.cache_storage})")
    print(f"naive loop   : {t_naive:7.2f} s  (decode per point)")
    print(f"ratio naive / cached: {t_naive / t_cached:.2f}x   same top-1 for every point: {same}")
    for row, res in zip(cached.rows, naive):
        print(f"  {row['point']:<28} top-1 {row['top1']:6.2f}  model-only {row['model_only_img_s'] or 0:9.0f} img/s"
              f"  end-to-end cached {row['end_to_end_img_s'] or 0:9.0f}  naive {res.end_to_end_ips or 0:9.0f} img/s")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
