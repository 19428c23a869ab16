"""Study: what the clustering's distance matmul costs, and which assignments change, in fp32 / tf32 / bf16.

The operators compute the assignment scores ||y||^2 - 2 f.y in float32 with autocast off (see
``tpool_cli/ops/clustering.py``). On a GPU, float32 matmuls run far below bf16 tensor-core speed, so
this script measures, on DeiT-S tokens at block 3 (random weights, images of flat regions, batch B),
each operator's time next to the block's under bf16 autocast and the share of assignments that
change when the assignment matmul runs in tf32 or bf16 instead (features centred in every case).
It swaps ``clustering.assign`` for the variants: a measurement, not a product option. ``tf32~`` is
TF32 emulated (inputs rounded to 10 mantissa bits, float32 accumulation): its timing means nothing,
its agreement tells on any device which assignments TF32 would change. The last lines compare
CUDA with CPU on the same float32 inputs.

    python benchmarks/distance_precision.py --device cuda --batch 256
    python benchmarks/distance_precision.py --device cpu --batch 4      # dry run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402

import tpool_cli.ops.clustering as cl  # noqa: E402
from tpool_cli.adapters.timm_vit import attention_with_features  # noqa: E402
from tpool_cli.device import steady_host_allocator  # noqa: E402
from tpool_cli.ops import make_operator  # noqa: E402
from tpool_cli.ops.base import ReduceContext  # noqa: E402

FP32_ASSIGN = cl.assign


def assign_tf32(f: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return FP32_ASSIGN(f, centers)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to TF32's 10 explicit mantissa bits (nearest, ties to even), still stored as float32."""
    bits = x.float().contiguous().view(torch.int32)
    bits = (bits + 0x0FFF + ((bits >> 13) & 1)) & -0x2000
    return bits.view(torch.float32)


def assign_tf32_emulated(f: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """What a TF32 tensor-core matmul computes (inputs rounded, float32 accumulation), on any device:
    lets a CPU say which assignments TF32 would change."""
    y_sq = torch.linalg.vecdot(centers.float(), centers.float()).unsqueeze(1)
    return torch.baddbmm(y_sq, round_to_tf32(f), round_to_tf32(centers).transpose(1, 2), alpha=-2.0).argmin(dim=-1)


def assign_bf16(f: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    y_sq = torch.linalg.vecdot(centers, centers).unsqueeze(1)
    return (y_sq - 2.0 * torch.bmm(f.bfloat16(), centers.bfloat16().transpose(1, 2)).float()).argmin(-1)


def region_images(batch: int, size: int = 224, regions: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    pixels = torch.stack([yy.flatten(), xx.flatten()], 1)
    chunks = []
    for start in range(0, batch, 32):
        m = min(32, batch - start)
        label = torch.cdist(pixels.expand(m, -1, -1), torch.rand(m, regions, 2, generator=g) * size).argmin(-1)
        colours = torch.randn(m, regions, 3, generator=g)
        chunks.append(torch.gather(colours, 1, label.unsqueeze(-1).expand(-1, -1, 3)).transpose(1, 2).reshape(m, 3, size, size))
    return torch.cat(chunks) + 0.2 * torch.randn(batch, 3, size, size, generator=g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--keep", type=float, default=0.7)
    args = parser.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cpu":
        steady_host_allocator()  # CPU timings independent of malloc's history (tpool_cli/device.py)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def time_it(fn, repeats: int = 30) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    torch.manual_seed(0)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, batch {args.batch}, keep {args.keep:g}")
    model = timm.create_model("deit_small_patch16_224", pretrained=False).to(dev).eval()
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)
    with torch.no_grad(), amp:
        x = model.norm_pre(model._pos_embed(model.patch_embed(region_images(args.batch).to(dev))))
        for blk in model.blocks[:3]:
            x = blk(x)
        blk = model.blocks[3]
        out, feats = attention_with_features(blk.attn, blk.norm1(x), None, frozenset({"significance", "keys", "cls_attn"}), 1)
        x = x + out
        block_time = time_it(lambda: blk(x))
    patches = x[:, 1:].contiguous()
    n = patches.shape[1]
    k = int(n * args.keep + 1e-9)
    sizes = torch.ones(args.batch, n, device=dev)
    ctx = ReduceContext(sizes=sizes, track=True, **feats)
    print(f"block (bf16 autocast, {n + 1} tokens): {block_time * 1e3:.3f} ms")

    with torch.no_grad():
        for op_name in ["kmeans", "kmedoids", "wkmeans", "wkmedoids"]:
            op = make_operator(op_name)
            reference = None
            variants = [("fp32", FP32_ASSIGN), ("tf32", assign_tf32), ("tf32~", assign_tf32_emulated), ("bf16", assign_bf16)]
            for variant, fn in variants if dev.type == "cuda" else [v for v in variants if v[0] != "tf32"]:
                cl.assign = fn
                try:
                    with amp:
                        result = op(patches, k, ctx)
                        elapsed = time_it(lambda: op(patches, k, ctx))
                finally:
                    cl.assign = FP32_ASSIGN
                reference = reference or result
                w = cl.clustering_weights(sizes, feats["significance"] if op.name.startswith("w") else None)
                objective = (cl.objective(patches.float(), w, result.tokens.float()) / w.sum(1)).mean().item()
                agree = (result.assignment == reference.assignment).float().mean().item()
                print(
                    f"{op_name:10s} {variant}: {elapsed * 1e3:8.3f} ms = {elapsed / block_time:.3f} of the block; "
                    f"objective per patch {objective:.4f}; final assignments equal to fp32: {agree:.4f}"
                )

        f = patches.float() - patches.float().mean(1, keepdim=True)
        centers = cl.gather_tokens(f, cl.significance_init(feats["significance"], k))
        a32 = FP32_ASSIGN(f, centers)
        for variant, fn in [("tf32", assign_tf32), ("tf32~", assign_tf32_emulated), ("bf16", assign_bf16)]:
            if variant == "tf32" and dev.type != "cuda":
                continue  # no TF32 on a CPU: the emulation (tf32~) stands in
            print(f"one assignment step (centred), {variant} equal to fp32: {(fn(f, centers) == a32).float().mean().item():.5f}")
        raw = patches.float()
        raw_centers = cl.gather_tokens(raw, cl.significance_init(feats["significance"], k))
        print(f"one assignment step (NOT centred), bf16 equal to fp32: {(assign_bf16(raw, raw_centers) == FP32_ASSIGN(raw, raw_centers)).float().mean().item():.5f}")

        if dev.type == "cuda":  # same float32 inputs on both devices
            sub = {key: value[:16].float() for key, value in feats.items()}
            for op_name in ["kmeans", "kmedoids", "wkmeans", "wkmedoids", "tome", "evit"]:
                op = make_operator(op_name)
                on_gpu = op(patches[:16].float(), k, ReduceContext(sizes=sizes[:16], track=True, **sub))
                on_cpu = op(
                    patches[:16].float().cpu(), k,
                    ReduceContext(sizes=sizes[:16].cpu(), track=True, **{key: v.cpu() for key, v in sub.items()}),
                )
                print(
                    f"{op_name}: CUDA vs CPU assignments equal {(on_gpu.assignment.cpu() == on_cpu.assignment).float().mean().item():.5f}, "
                    f"max token difference {(on_gpu.tokens.cpu() - on_cpu.tokens).abs().max().item():.2e}"
                )


if __name__ == "__main__":
    main()
