"""Train the built-in demo model ``tpool_digits_vit`` on scikit-learn's handwritten digits.

    python scripts/train_demo.py                 # writes tpool_cli/assets/ (weights, record, test split)
    python scripts/train_demo.py --out-dir /tmp/x --epochs 2   # a quick try elsewhere

Data: ``sklearn.datasets.load_digits()`` (1,797 real 8x8 greyscale digits, values 0..16), scaled
to 0..255 uint8 and split 80/20, stratified by class, with ``random_state=seed`` (1,437 train,
360 test). Every image reaches the model the way a PNG of it would through an image folder:
greyscale PIL image -> ``.convert("RGB")`` -> the model's own timm eval transform (bilinear resize
8 -> 32 px, crop_pct 1.0, normalise with the registered mean/std). Bilinear rather than nearest:
with nearest, a 4x4 patch would be one flat pixel; bilinear gives each patch token the local
stroke shape, which is closer to what a patch of a natural image holds.

Training: AdamW, cosine schedule with a linear warmup, label smoothing, and random shifts of up
to one original pixel (4 px at 32 px) as the only augmentation; 2 CPU threads; deterministic for
a given seed (seeded init, seeded shuffling and shifts, ``torch.use_deterministic_algorithms``).

Writes into ``--out-dir``: ``tpool_digits_vit.safetensors`` (fp32 weights),
``tpool_digits_vit.json`` (the record: seed, split, hyperparameters, time, test top-1, versions)
``digits_test.safetensors`` (the test split the package writes out as an image folder) and
``digits_train.safetensors`` (the training split, for ``tpool finetune`` on the demo).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import sklearn  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.numpy import save_file as save_numpy  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from timm.data import create_transform, resolve_data_config  # noqa: E402

from tpool_cli import demo  # noqa: E402

TEST_SIZE = 0.2


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=int, default=2)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--max-shift", type=int, default=4, help="random shift in pixels at 32 px (0 = no augmentation)")
    p.add_argument("--eval-batch-size", type=int, default=120)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=Path(demo.ASSETS))
    return p.parse_args()


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as 8x8 uint8 in 0..255 (the raw 0..16 scaled and rounded) and their labels."""
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def random_shift(x: torch.Tensor, max_shift: int, background: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels each way, filling with the background value."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = torch.empty(b, x.shape[1], h + 2 * max_shift, w + 2 * max_shift)
    padded[:] = background.view(1, -1, 1, 1)
    padded[:, :, max_shift : max_shift + h, max_shift : max_shift + w] = x
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=gen)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[int, float]:
    """Number of correct top-1 predictions and the smallest top1-top2 logit margin (how close to a tie)."""
    model.eval()
    logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    top2 = logits.topk(2, dim=1).values
    return int((logits.argmax(1) == y).sum()), float((top2[:, 0] - top2[:, 1]).min())


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    load_start = os.getloadavg()[0]  # other work on the machine slows training: say how busy it was

    images, labels = digits_uint8()
    train_idx, test_idx = train_test_split(
        np.arange(len(images)), test_size=TEST_SIZE, stratify=labels, random_state=args.seed
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)

    torch.manual_seed(args.seed)
    model = timm.create_model(demo.DEMO_MODEL, pretrained=False)
    config = resolve_data_config({}, model=model)
    transform = create_transform(**config)
    x_train = demo.digits_to_tensors(images[train_idx], transform)
    x_test = demo.digits_to_tensors(images[test_idx], transform)
    y_train, y_test = torch.from_numpy(labels[train_idx]), torch.from_numpy(labels[test_idx])
    background = (0.0 - torch.tensor(config["mean"])) / torch.tensor(config["std"])  # a black pixel, normalised

    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (step + 1) / warmup_steps
        if step < warmup_steps
        else 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps))),
    )
    gen = torch.Generator().manual_seed(args.seed)

    train_start, train_cpu_start = time.perf_counter(), time.process_time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        running = 0.0
        for i in range(0, len(order), args.batch_size):
            batch = order[i : i + args.batch_size]
            inputs = random_shift(x_train[batch], args.max_shift, background, gen)
            loss = F.cross_entropy(model(inputs), y_train[batch], label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item() * len(batch)
        correct, _ = evaluate(model, x_test, y_test, args.eval_batch_size)
        print(
            f"epoch {epoch + 1:2d}/{args.epochs}  loss {running / len(x_train):.4f}  "
            f"test top-1 {100 * correct / len(x_test):.2f}%  ({time.perf_counter() - train_start:.0f} s)",
            file=sys.stderr,
        )
    train_seconds = time.perf_counter() - train_start
    train_cpu_seconds = time.process_time() - train_cpu_start  # CPU time of all threads: robust to a busy machine
    correct, margin = evaluate(model, x_test, y_test, args.eval_batch_size)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = args.out_dir / demo.WEIGHTS_FILE.name
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights_path), metadata={"format": "pt"})  # one key: the header stays byte-identical run to run
    split_path = args.out_dir / demo.TEST_SPLIT_FILE.name
    save_numpy(
        {"images": np.ascontiguousarray(images[test_idx]), "labels": labels[test_idx], "indices": test_idx.astype(np.int64)},
        str(split_path),
    )
    train_split_path = args.out_dir / demo.TRAIN_SPLIT_FILE.name  # what `tpool finetune` trains on offline
    save_numpy(
        {"images": np.ascontiguousarray(images[train_idx]), "labels": labels[train_idx], "indices": train_idx.astype(np.int64)},
        str(train_split_path),
    )
    for path in (weights_path, split_path, train_split_path):
        path.chmod(0o644)  # safetensors writes 0600; package data must be readable by every user
    record = {
        "model": demo.DEMO_MODEL,
        "architecture": {k: v for k, v in demo.ARCH.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": "sklearn.datasets.load_digits (1797 8x8 images, 10 classes), pixels 0..16 scaled to 0..255 uint8",
        "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "split": {
            "method": "sklearn.model_selection.train_test_split, stratified, indices sorted",
            "test_size": TEST_SIZE,
            "random_state": args.seed,
            "train": len(train_idx),
            "test": len(test_idx),
        },
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": f"AdamW lr {args.lr} weight_decay {args.weight_decay}, cosine with {args.warmup_epochs} warmup epochs",
        "label_smoothing": args.label_smoothing,
        "augmentation": f"random shift up to {args.max_shift} px at 32 px" if args.max_shift else "none",
        "threads": args.threads,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "test_correct": correct,
        "test_total": len(test_idx),
        "test_top1": round(100 * correct / len(test_idx), 4),
        "test_min_logit_margin": round(margin, 6),
        "eval_batch_size": args.eval_batch_size,
        "weights_sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest(),
        "test_split_sha256": hashlib.sha256(split_path.read_bytes()).hexdigest(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "scikit-learn": sklearn.__version__,
            "numpy": np.__version__,
        },
        "cpu": platform.processor() or platform.machine(),
        "load_average_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "command": " ".join(["python scripts/train_demo.py", *sys.argv[1:]]),
    }
    (args.out_dir / demo.RECORD_FILE.name).write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"test top-1 {record['test_top1']:.2f}% ({correct}/{len(test_idx)}), trained in {train_seconds:.0f} s; "
        f"wrote {weights_path} ({weights_path.stat().st_size / 1e6:.1f} MB)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
