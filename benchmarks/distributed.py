"""Scaling efficiency of `evaluate` on a decoded (cached) folder under torchrun.

    python benchmarks/distributed.py                      # CPU: 2 ranks x 1 thread vs 1 rank x 1 thread
    python benchmarks/distributed.py --nproc 8 --device cuda --model deit_small_patch16_224 \
        --data /path/to/imagenet/val --limit 10000 --batch-size 256

efficiency = img/s at world size N / (N x img/s at world size 1), where img/s is the model-only
figure of the result (each rank's forward passes timed with the device synchronised, summed over
the ranks, which run at the same time). Each world size is one fresh torchrun job that scans the
folder, decodes its share once (``decode_once``, the cache of ``tpool pareto``), runs one untimed
pass (warm-up) and then ``--repeats`` timed passes, and reports the median. The numbers are
checked to be the same at every world size (top-1 counts), so the speed is that of the same work.

Without ``--data`` it runs the built-in demo (the digits ViT on its 360 test images). Goal on
GPUs: >= 0.9 at 8 ranks. On one CPU machine the ranks share memory bandwidth and caches, so
below 1.0 there mostly measures the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One rank: decode the share once, time evaluate on it; rank 0 prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    import torch

    from tpool_cli.data import data_config, decode_once, scan_folder
    from tpool_cli.demo import DEMO_MODEL, ensure_demo_data
    from tpool_cli.device import resolve_device
    from tpool_cli.distributed import is_main, local_device, shard, world
    from tpool_cli.evaluate import evaluate
    from tpool_cli.models import load_model

    torch.set_num_threads(args.threads)
    if args.data:
        root, class_map, model = Path(args.data), args.class_map, args.model
    else:
        demo = ensure_demo_data()
        root, class_map, model = demo.root, demo.class_map, DEMO_MODEL
    dev = local_device(resolve_device(args.device))
    folder = scan_folder(root, class_map=class_map, limit=args.limit)
    torch.manual_seed(0)
    loaded = load_model(model, random_init=bool(args.data), device=dev)
    decoded = decode_once(shard(folder), data_config(loaded.model), batch_size=args.batch_size, workers=0).to(dev)
    runs, result = [], None
    for i in range(args.repeats + 1):
        result = evaluate(loaded, decoded, device=dev, batch_size=args.batch_size, count=False)
        if i:  # the first pass warms up kernels and allocators
            runs.append(result.model_only_ips)
    if is_main():
        print(json.dumps({"world_size": world().size, "img_s": statistics.median(runs), "runs": runs,
                          "correct1": result.correct1, "images": result.images, "device": result.config["device_name"]}))


def launch(nproc: int, args: argparse.Namespace) -> dict:
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if v is not None and k not in ("nproc", "worker")]
    script = [str(Path(__file__).resolve()), "--worker", *forwarded]
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []), *script]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"world size {nproc} failed:\n{proc.stderr[-3000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the scaled run (one per device)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--model", default="deit_small_patch16_224", help="with --data (random weights: speed only)")
    parser.add_argument("--data")
    parser.add_argument("--class-map")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    one, many = launch(1, args), launch(args.nproc, args)
    if (one["correct1"], one["images"]) != (many["correct1"], many["images"]):
        sys.exit(f"the runs disagree: {one} vs {many}")
    efficiency = many["img_s"] / (args.nproc * one["img_s"])
    print(f"device: {one['device']} per rank; {one['images']} images, batch {args.batch_size}, median of {args.repeats} passes")
    print(f"world size 1: {one['img_s']:,.1f} img/s (runs {', '.join(f'{r:,.1f}' for r in one['runs'])})")
    print(f"world size {args.nproc}: {many['img_s']:,.1f} img/s (runs {', '.join(f'{r:,.1f}' for r in many['runs'])})")
    print(f"scaling efficiency = {many['img_s']:,.1f} / ({args.nproc} x {one['img_s']:,.1f}) = {efficiency:.3f}")


if __name__ == "__main__":
    main()
