"""Training speed with the operator in place, relative to the unpatched model, measured in one run.

Token reduction should speed training up as it speeds inference: the blocks after a reduction
run on fewer tokens in the forward and the backward pass. One training step = forward, loss,
backward, AdamW step, on a synthetic batch (no data loading), for the unpatched model and for
each operator at each keep rate. Rounds are interleaved (every repeat times every candidate
once) and medians are reported as ratios to the unpatched model, so a busy machine slows all
alike.

    python benchmarks/finetune.py                                  # the demo model, CPU
    python benchmarks/finetune.py --model deit_small_patch16_224 --device cuda --batch 128 --amp bf16
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402

import tpool_cli.demo  # noqa: E402,F401  (registers tpool_digits_vit with timm)
from tpool_cli.device import resolve_amp, resolve_device, synchronize  # noqa: E402
from tpool_cli.finetune import distillation_loss  # noqa: E402
from tpool_cli.patch import patch, unpatch  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tpool_digits_vit")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="training steps per timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ops", default="topk,kmeans,tome,evit")
    p.add_argument("--keep", default="0.7,0.5")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def time_steps(model, teacher, x, y, steps, device, amp_dtype) -> float:
    """Seconds for ``steps`` training steps (forward with distillation, backward, AdamW)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
            with torch.no_grad():
                target = teacher(x)
            loss = 0.5 * torch.nn.functional.cross_entropy(logits.float(), y) + 0.5 * distillation_loss(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp_dtype = resolve_amp(args.amp, device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).to(device)
    teacher = timm.create_model(args.model, pretrained=False).to(device).eval()
    cfg = model.pretrained_cfg
    x = torch.randn(args.batch, *cfg["input_size"], device=device)
    y = torch.randint(0, model.num_classes, (args.batch,), device=device)
    candidates = [("unpatched", None, None)] + [
        (f"{op} keep {keep}", op, float(keep)) for keep in args.keep.split(",") for op in args.ops.split(",")
    ]
    times: dict[str, list[float]] = {name: [] for name, _, _ in candidates}
    for rnd in range(args.warmup + args.repeats):
        for name, op, keep in candidates:
            unpatch(model)
            if op is not None:
                patch(model, op, keep=keep)
            dt = time_steps(model, teacher, x, y, args.steps, device, amp_dtype)
            if rnd >= args.warmup:
                times[name].append(dt)
    unpatch(model)
    base = statistics.median(times["unpatched"])
    print(f"# training speed, {args.model}, batch {args.batch}, {device.type} ({platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| variant | train img/s | spread (max/min) | vs unpatched |")
    print("|---|---|---|---|")
    for name, _, _ in candidates:
        med = statistics.median(times[name])
        spread = max(times[name]) / min(times[name])
        print(f"| {name} | {args.batch * args.steps / med:.1f} | {spread:.2f} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
