"""tpool's `atc` next to the procedure of ATC's reference code, on the same keys: time and partition.

ATC's reference (JoakimHaurum/ATC, ``ATC_setup/models/atc.py``, ``agglomerative_clustering`` +
``merge_wavg``) computes ``1 - cos`` of the keys on the model's device, moves it to the host as
NumPy and calls ``sklearn.cluster.AgglomerativeClustering(n_clusters=K, metric="precomputed",
linkage=...)`` once per image, then pools size-weighted. This script re-expresses that procedure
(``reference_operator``: the same calls in the same order, not the repository's code; on the patch
keys alone: the reference's product also has the class token's row and column, sliced off after) and times it,
tpool's ``atc`` operator and tpool's ``tome`` operator on one DeiT-S block's keys, interleaved in one
run (every repeat times every candidate once), medians reported with their ratios; it also counts
the images on which the reference's and tpool's partitions agree (up to relabelling). One
reduction, 196 patch tokens to K, as ``benchmarks/operators.py``.

    python benchmarks/atc_reference.py --batch 8 --threads 1
    python benchmarks/atc_reference.py --batch 64 --keep 0.5 --linkage complete --threads 1
    python benchmarks/atc_reference.py --batch 8 --threads 1 --compile   # + both operators under torch.compile

``--compile`` adds tpool's two operators compiled by inductor (``fullgraph=True``, ``dynamic=False``:
``atc`` then runs its sequential form, one merge per step, 105-163 s to compile at 196
tokens on 2 CPU cores with a cold inductor cache), with their compile times, and checks that compiled ``atc`` gives eager's
assignment.

Needs scikit-learn (in the test extras: ``pip install -e '.[test]'``), as the reference does.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from tpool_cli.adapters.timm_vit import attention_with_features  # noqa: E402
from tpool_cli.device import steady_host_allocator  # noqa: E402
from tpool_cli.ops import make_operators  # noqa: E402
from tpool_cli.ops.base import KEYS, ReduceContext  # noqa: E402
from tpool_cli.speedflags import machine_load, speed_flag, spread  # noqa: E402

from operators import GRID, checked_device, deit_small_block, keep_rate, positive_int, timer  # noqa: E402  (benchmarks/operators.py: this script's folder is on the path)


def reference_labels(keys: torch.Tensor, k: int, linkage: str) -> torch.Tensor:
    """Cluster labels as ATC's reference gets them: device cosine, host NumPy, scikit-learn per image."""
    from sklearn.cluster import AgglomerativeClustering

    with torch.no_grad():
        unit = keys / keys.norm(dim=-1, keepdim=True)
        distances = (1 - unit @ unit.transpose(-1, -2)).cpu().numpy()
    clustering = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=linkage)
    labels = [torch.from_numpy(clustering.fit(image).labels_) for image in distances]
    return torch.stack(labels).to(device=keys.device, dtype=torch.long)


def reference_operator(x: torch.Tensor, sizes: torch.Tensor, keys: torch.Tensor, k: int, linkage: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's whole reduction: labels, then ``merge_wavg``'s size-weighted scatter sums."""
    labels = reference_labels(keys, k, linkage)
    b, _, c = x.shape
    index = labels.unsqueeze(-1)
    summed = torch.zeros(b, k, c, dtype=x.dtype, device=x.device).scatter_reduce(1, index.expand(-1, -1, c), x * sizes.unsqueeze(-1), reduce="sum")
    size = torch.zeros(b, k, 1, dtype=x.dtype, device=x.device).scatter_reduce(1, index, sizes.unsqueeze(-1), reduce="sum")
    return summed / size, size.squeeze(-1)


def compiled_candidates(atc, tome, patches, sizes, keys, k: int, tome_k: int, compile_s: dict[str, float]) -> dict[str, Callable[[], object]]:
    """Both tpool operators compiled by inductor (one graph each, static shapes), compiled here
    (the first call, timed into ``compile_s``) so that the timed repeats see only steady calls."""
    out: dict[str, Callable[[], object]] = {}
    for name, op, target in (("tpool atc (compiled)", atc, k), ("tpool tome (compiled)", tome, tome_k)):
        def reduce(x, s, kk, op=op, target=target):
            r = op.reduce(x, target, ReduceContext(sizes=s, grid=GRID, seed=0, num_prefix=1, layer=0, depth=12, keys=kk))
            return r.tokens, r.sizes, r.assignment

        fn = torch.compile(reduce, fullgraph=True, dynamic=False)
        start = time.perf_counter()
        with torch.no_grad():
            fn(patches, sizes, keys)
        compile_s[name] = time.perf_counter() - start
        out[name] = lambda fn=fn: fn(patches, sizes, keys)
    return out


def canonical(labels: torch.Tensor) -> torch.Tensor:
    """Labels renumbered in order of first appearance (per image), so that equal partitions compare equal."""
    renumbered = []
    for image in labels.tolist():
        first: dict[int, int] = {}
        renumbered.append([first.setdefault(label, len(first)) for label in image])
    return torch.tensor(renumbered)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--keep", type=keep_rate, default=0.7)
    parser.add_argument("--linkage", default="average", choices=["average", "complete", "single"])
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 gives stable numbers on a loaded machine)")
    parser.add_argument("--compile", action="store_true", help="also time both tpool operators compiled by inductor (minutes to compile)")
    args = parser.parse_args()
    try:
        import sklearn  # noqa: F401
    except ImportError:
        parser.exit(2, "error: this benchmark needs scikit-learn (pip install -e '.[test]'), as ATC's reference does\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = checked_device(parser, args.device)
    if device.type == "cpu":
        steady_host_allocator()  # CPU timings independent of malloc's history (tpool_cli/device.py)

    block, x, n, k = deit_small_block(args.batch, args.keep, device)
    grid = GRID
    with torch.no_grad():
        _, features = attention_with_features(block.attn, block.norm1(x), None, frozenset({KEYS}), 1)
    keys = features[KEYS]
    patches = x[:, 1:].contiguous()
    sizes = torch.ones(args.batch, n, device=device)
    ctx = ReduceContext(sizes=sizes, grid=grid, seed=0, num_prefix=1, layer=0, depth=12, keys=keys)
    atc, tome = make_operators(["atc", "tome"], {"linkage": args.linkage})
    tome_k = tome.realise(n, k, grid)

    candidates: dict[str, Callable[[], object]] = {
        "reference (scikit-learn per image)": lambda: reference_operator(patches, sizes, keys, k, args.linkage),
        "tpool atc": lambda: atc(patches, k, ctx),
        "tpool tome": lambda: tome(patches, tome_k, ctx),
    }
    compile_s: dict[str, float] = {}
    if args.compile:
        candidates.update(compiled_candidates(atc, tome, patches, sizes, keys, k, tome_k, compile_s))
    measure = timer(device)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.no_grad():
        for _ in range(args.warmup):
            for fn in candidates.values():
                fn()
        for _ in range(args.repeats):
            for name, fn in candidates.items():
                times[name].append(measure(fn))
        eager_assignment = atc(patches, k, ctx).assignment
        same = (canonical(reference_labels(keys, k, args.linkage)) == canonical(eager_assignment)).all(dim=1)
        if args.compile:
            compiled_same = bool(torch.equal(candidates["tpool atc (compiled)"]()[2], eager_assignment))
    med = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    load = machine_load(device.type, torch.get_num_threads() if device.type == "cpu" else None, device.index or 0)
    spreads = {name: spread(values) for name, values in times.items()}
    ref, ours, matching = med["reference (scikit-learn per image)"], med["tpool atc"], med["tpool tome"]

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(f"# atc against ATC's reference procedure: one DeiT-S block's keys, {args.batch} images, {n} -> {k} patch tokens, linkage {args.linkage}")
    print()
    print(
        f"device: {gpu or platform.processor() or 'cpu'} ({device.type}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"fp32, median of {args.repeats} interleaved repeats (spread: (max - min) / median; flag: tpool's speed flag)"
    )
    print(f"same partition as the reference (up to relabelling): {int(same.sum())} of {args.batch} images")
    if args.compile:
        print(f"compiled atc gives eager's assignment: {'yes' if compiled_same else 'NO'}; compile time: "
              + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in compile_s.items()))
    print()
    print("| operator | ms | spread | / tpool atc | / tpool tome | flag |")
    print("|---|---|---|---|---|---|")
    for name in candidates:
        shown = "-" if spreads[name] is None else f"{spreads[name]:.0%}"
        flag = speed_flag(spreads[name], load) or ""
        print(f"| {name} | {med[name]:.2f} | {shown} | {med[name] / ours:.2f} | {med[name] / matching:.2f} | {flag} |")
    print()
    print(f"reference / tpool atc: {ref / ours:.2f}x; tpool atc / tpool tome: {ours / matching:.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
