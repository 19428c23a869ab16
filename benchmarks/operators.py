"""What each token-reduction operator costs next to the transformer block it sits in.

One DeiT-S-shaped block (width 384, 6 heads, 197 tokens = class + 14 x 14 patches), one reduction
at keep 0.7 (196 -> 137 patch tokens), clustering with 5 iterations. Measured in one run, interleaved
(every repeat times every candidate once), medians reported as ratios to the plain block:

* ``op / block``: the operator's ``reduce`` alone (features already computed);
* ``features / block``: what computing the features the operator reads costs on top of fused
  attention (explicit attention for significance, the class-attention row, keys);
* ``reducing block / block``: the whole patched block (attention + features + operator + MLP on the
  kept tokens), the number that matters; ``ideal`` is the same block with a free reduction (the
  first K tokens, fused attention), the ceiling an operator can reach.

    python benchmarks/operators.py --device cpu --batch 8          # quick CPU run (--threads 1 on a busy machine)
    python benchmarks/operators.py --device cuda --batch 256        # GPU, bf16 autocast by default
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from timm.models.vision_transformer import Block  # noqa: E402

from tpool_cli.adapters.timm_vit import attention_with_features  # noqa: E402
from tpool_cli.device import steady_host_allocator  # noqa: E402
from tpool_cli.ops import make_operators, operator_names  # noqa: E402
from tpool_cli.errors import TpoolError  # noqa: E402
from tpool_cli.ops.base import FEATURES, ReduceContext, Reduction, TokenOperator  # noqa: E402
from tpool_cli.patch import Reducer, ReducingBlock, ReductionState  # noqa: E402
from tpool_cli.schedule import Schedule  # noqa: E402


@dataclass(frozen=True)
class FreeReduction(TokenOperator):
    """The ceiling: keep the first K tokens, read nothing (benchmark only, not registered)."""

    name = "ideal"

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        b, n = x.shape[:2]
        keep = torch.arange(n, device=x.device)
        assignment = torch.where(keep < k, keep, -1).expand(b, n)  # the template's contract: always an assignment
        return Reduction(x[:, :k], ctx.sizes[:, :k], assignment)


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def measure(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return measure


GRID = (14, 14)  # DeiT-S at 224 px: 196 patch tokens after the class token


def keep_rate(text: str) -> float:
    """argparse type: a keep rate, checked by the CLI's own rule (``Schedule``: in (0, 1])."""
    try:
        value = float(text)
        Schedule(keep=value)
    except (ValueError, TpoolError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a batch size, a repeat count)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def checked_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """The device asked for, or one argparse error line when it is CUDA on a machine without it."""
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    return torch.device(name)


def deit_small_block(batch: int, keep: float, device: torch.device) -> tuple[Block, torch.Tensor, int, int]:
    """A DeiT-S-shaped block (width 384, 6 heads, random weights, seed 0), a batch of random
    tokens (class + 196 patches) and the patch counts n -> k one reduction at ``keep`` gives."""
    torch.manual_seed(0)
    n = GRID[0] * GRID[1]
    k = max(1, math.floor(n * keep + 1e-9))
    block = Block(dim=384, num_heads=6, mlp_ratio=4.0, qkv_bias=True).to(device).eval()
    return block, torch.randn(batch, n + 1, 384, device=device), n, k


def reducing_block(block: torch.nn.Module, operator: TokenOperator, k: int, grid: tuple[int, int]) -> ReducingBlock:
    """The patch mechanism's own block wrapper, reducing to k patch tokens (index 0: state reset every call)."""
    state = ReductionState(num_prefix=1, initial_grid=grid)
    return ReducingBlock(block, 0, k, Reducer(operator, state, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--keep", type=keep_rate, default=0.7)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--features", default=None, choices=["tokens", "keys"], help="clustering features (default: tokens)")
    parser.add_argument("--init", default=None, choices=["significance", "farthest"], help="clustering seeds (default: significance)")
    parser.add_argument("--ops", default=",".join(n for n in operator_names() if n != "none"))
    parser.add_argument("--amp", default=None, choices=["bf16", "none"], help="default: bf16 on cuda, none on cpu")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed repeats (default 10 on cpu, 50 on cuda)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 gives stable numbers on a loaded machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = checked_device(parser, args.device)
    if device.type == "cpu":
        steady_host_allocator()  # CPU timings independent of malloc's history (tpool_cli/device.py)
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    repeats = args.repeats or (50 if device.type == "cuda" else 10)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16" else nullcontext()
    grid = GRID
    block, x, n, k = deit_small_block(args.batch, args.keep, device)
    width = x.shape[-1]
    patches = x[:, 1:].contiguous()

    with torch.no_grad(), autocast:
        _, all_features = attention_with_features(block.attn, block.norm1(x), None, frozenset(FEATURES), 1)
    sizes = torch.ones(args.batch, n, device=device)

    candidates: dict[str, Callable[[], object]] = {"block": lambda: block(x)}
    fused = lambda: attention_with_features(block.attn, block.norm1(x), None, frozenset(), 1)  # noqa: E731
    candidates["attention (fused)"] = fused
    ideal = reducing_block(block, FreeReduction(), k, grid)
    candidates["ideal"] = lambda: ideal(x)
    # the clustering options go to the operators that have them (make_operators), the others ignore them
    names = [name for name in args.ops.split(",") if name]
    from tpool_cli.ops import option_types

    try:
        known = {key for name in names for key in option_types(name)}
        clustering = {k: v for k, v in dict(iters=args.iters, features=args.features, init=args.init).items() if k in known}
        ops = make_operators(names, clustering)
    except TpoolError as exc:  # an unknown operator or option value: the CLI's own message
        parser.error(str(exc))
    realised = {}
    for op in ops:
        needs = op.needs()
        ctx = ReduceContext(sizes=sizes, grid=grid, seed=0, num_prefix=1, layer=0, depth=12, **{f: all_features[f] for f in needs})
        realised[op.name] = op.realise(n, k, grid)
        candidates[f"{op.name}: op"] = (lambda op=op, ctx=ctx, kk=realised[op.name]: op(patches, kk, ctx))
        candidates[f"{op.name}: attention + features"] = (
            lambda needs=needs: attention_with_features(block.attn, block.norm1(x), None, needs, 1)
        )
        wrapped = reducing_block(block, op, k, grid)
        candidates[f"{op.name}: reducing block"] = (lambda wrapped=wrapped: wrapped(x))

    measure = timer(device)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.no_grad(), autocast:
        for _ in range(args.warmup):
            for fn in candidates.values():
                fn()
        for _ in range(repeats):
            for name, fn in candidates.items():
                times[name].append(measure(fn))
    med = {name: statistics.median(values) for name, values in times.items()}
    blk = med["block"]

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"# Operators vs one DeiT-S block ({args.batch} x {n + 1} tokens x {width}), keep {args.keep:g} ({n} -> {k} patch tokens), iters {args.iters}")
    print()
    print(
        f"device: {gpu or platform.processor() or 'cpu'} ({device.type}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, amp {amp}, median of {repeats} interleaved repeats"
    )
    print(f"block: {blk * 1e3:.2f} ms; ideal reducing block (free reduction): {med['ideal'] * 1e3:.2f} ms = {med['ideal'] / blk:.3f} of the block")
    print()
    print("| op | K | op ms | op / block | features / block | reducing block / block | reducing block / ideal |")
    print("|---|---|---|---|---|---|---|")
    for op in ops:
        features = max(0.0, med[f"{op.name}: attention + features"] - med["attention (fused)"])
        whole = med[f"{op.name}: reducing block"]
        print(
            f"| {op.label()} | {realised[op.name]} | {med[f'{op.name}: op'] * 1e3:.2f} | {med[f'{op.name}: op'] / blk:.3f} "
            f"| {features / blk:.3f} | {whole / blk:.3f} | {whole / med['ideal']:.3f} |"
        )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
