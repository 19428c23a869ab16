"""ATC (Haurum et al., "Agglomerative Token Clustering", ECCV 2024): bottom-up clustering of the keys.

Within a block, the patch tokens are clustered bottom-up on the cosine distance of the block's
keys (mean over heads), ``1 - cos``, until K clusters remain; each cluster becomes one token,
the size-weighted mean of its members, whose size is the sum of theirs. ``linkage`` decides the
distance between two clusters: ``average`` (ATC's default: the mean distance over all pairs of
members, UPGMA), ``complete`` (the largest) or ``single`` (the smallest). ATC's reference calls
``sklearn.cluster.AgglomerativeClustering(n_clusters=K, metric="precomputed", linkage=...)``
once per image on the CPU; this module gives the same partition (ties aside) batched on the
model's device:

* the B x N x N distance matrix is made exactly symmetric from its upper triangle (the part
  scikit-learn reads), with +inf on the diagonal;
* N - K merge steps, each a fixed sequence of batched tensor ops with no host sync: the
  closest pair (i < j) of every image by one argmin over its matrix, the merged cluster's
  distances to all others by the Lance-Williams update of row i (average: (n_i d_i + n_j d_j) /
  (n_i + n_j) with n the member counts; complete: max; single: min), written into row and
  column i, row and column j set to +inf; j's parent becomes i;
* after the loop, pointer jumping gives every token its cluster's root (its lowest index), and
  clusters are numbered in the order of their roots.

For these three linkages the greedy closest-pair procedure builds the same dendrogram as
scipy's nearest-neighbour chain / minimum spanning tree that scikit-learn uses, and cutting
that dendrogram at K clusters keeps exactly its N - K lowest merges: the first N - K greedy
merges. The linkage counts members (tokens of this block), not the patches they stand for, as
the reference does (scikit-learn never sees the sizes); only the pooling uses the sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .base import KEYS, MeanPosition, ReduceContext, Reduction, TokenOperator
from .common import pool_by_assignment

Linkage = Literal["average", "complete", "single"]


def cosine_distances(keys: torch.Tensor) -> torch.Tensor:
    """B x N x D features -> B x N x N float32 ``1 - cos``, exactly symmetric (upper triangle mirrored).

    The mirror matters: a matmul need not round (i, j) and (j, i) alike, and the merge loop's
    argmin relies on symmetry to return the pair with i < j first.
    """
    k = keys.float()
    k = k / torch.linalg.vecdot(k, k).sqrt().clamp_min(1e-12).unsqueeze(-1)
    d = 1.0 - k @ k.transpose(1, 2)
    n = d.shape[-1]
    upper = torch.ones(n, n, dtype=torch.bool, device=d.device).triu(1)
    return torch.where(upper, d, d.transpose(1, 2))


def _roots(parent: torch.Tensor, n: int) -> torch.Tensor:
    """Follow parent pointers (flat ids, parent <= id, chains within n ids) to every id's root by pointer jumping."""
    for _ in range(max(1, math.ceil(math.log2(n)))):
        parent = parent[parent]
    return parent


def _merged_row(rows: torch.Tensor, pair_counts: torch.Tensor | None, linkage: str) -> torch.Tensor:
    """Lance-Williams: distances of the merged cluster i+j to every cluster (B x 1 x W).

    rows: B x 2 x W, the rows of i and j; pair_counts: B x 2 x 1 member counts (average only).
    +inf (dead clusters, padding, the diagonal) stays +inf for average and complete; single's
    caller masks columns i and j.
    """
    if linkage == "average":  # (n_i d_i + n_j d_j) / (n_i + n_j): scipy's formula and order of operations
        return (rows * pair_counts).sum(dim=1, keepdim=True) / pair_counts.sum(dim=1, keepdim=True)
    if linkage == "complete":
        return rows.amax(dim=1, keepdim=True)
    return rows.amin(dim=1, keepdim=True)


def agglomerative_labels(dist: torch.Tensor, k: int, linkage: str = "average") -> torch.Tensor:
    """Cluster index in [0, k) of every point (B x N long) after agglomerating to k clusters.

    dist: B x N x N symmetric distances (the diagonal is ignored), in the dtype the merges run in
    (float32 in the operator; float64 reproduces scipy's arithmetic). Clusters are numbered in the order of their lowest member. N - k
    sequential steps of batched work, no host sync, no loop over images; equal distances go to
    the pair first in row-major order (i < j).

    Finding the closest pair by an argmin over the whole matrix costs N^2 per step; instead rows
    are cut into blocks of g ~ sqrt(N / 2) and ``blockmin[b, blk, c]`` keeps the minimum of column c
    over the block's rows (by symmetry: of row c over the block's columns), so the row minima
    are one reduction over blocks. A merge changes only rows and columns i and j: a step
    recomputes the two row blocks holding i and j (one contiguous gather) and writes columns i
    and j of ``blockmin`` from the merged row: O(N sqrt(N)) per step, exact for any linkage.

    Everything is indexed by flat ids ``b * W + index`` (W: N padded to whole blocks), the matrix
    and its block minima share one buffer (one ``put_`` writes both columns), and the parent
    pointers are written once after the loop (an absorbed cluster's row and column are +inf, so
    it is never picked again: each id is absorbed at most once). A step is about twenty batched
    ops; at small batches their fixed cost, not the arithmetic, is most of its time.
    """
    b, n, _ = dist.shape
    dev, dtype = dist.device, dist.dtype
    g = max(1, math.isqrt(max(1, (n - 1) // 2)) + 1)  # block width ~ sqrt(N / 2): a step reads 2 g + N / g rows
    blocks = -(-n // g)
    w = blocks * g  # rows and columns padded with +inf up to whole blocks
    # one buffer for the matrix and its block minima, so that one put_ writes a step's changes to both
    store = torch.full((b * w * w + b * blocks * w,), math.inf, dtype=dtype, device=dev)
    d = store[: b * w * w].view(b, w, w)
    d[:, :n, :n] = dist
    d.diagonal(dim1=1, dim2=2).fill_(math.inf)
    rows_of = d.view(b * w, w)
    row_blocks = d.view(b * blocks, g * w)
    blockmin = store[b * w * w :].view(b, blocks, w)  # [b, blk, c]: min of column c over the block's rows
    blockmin.copy_(d.view(b, blocks, g, w).amin(dim=2))
    blockmin_rows = blockmin.view(b * blocks, w)
    count = torch.ones(b * w, 1, dtype=dtype, device=dev)
    base = torch.arange(b, device=dev) * w
    image = torch.arange(b, device=dev).unsqueeze(1)
    # where a step writes columns, per flat id f = b * w + c of the merged (absorbed) cluster c:
    # column c of d (b * w * w + row * w + c) and of blockmin (after d in the store)
    columns = torch.cat(
        [
            image * (w * w - w) + torch.arange(w, device=dev) * w,
            b * w * w + image * (blocks * w - w) + torch.arange(blocks, device=dev) * w,
        ],
        dim=1,
    ).unsqueeze(1)  # B x 1 x (W + blocks)
    dead = torch.full((b, 1, w), math.inf, dtype=dtype, device=dev)
    absorbed: list[torch.Tensor] = []
    for _ in range(n - k):
        flat_i = blockmin.amin(dim=1).argmin(dim=1) + base  # first row holding the minimum: i < j
        flat_j = rows_of.index_select(0, flat_i).argmin(dim=1) + base
        flat_ij = torch.stack([flat_i, flat_j], dim=1)  # B x 2
        rows = rows_of.index_select(0, flat_ij.view(-1)).view(b, 2, w)
        pair_counts = count.index_select(0, flat_ij.view(-1)).view(b, 2, 1) if linkage == "average" else None
        merged = _merged_row(rows, pair_counts, linkage)  # B x 1 x W
        if linkage == "single":  # min(d_ij, inf) at i and j: they are not its neighbours
            merged.scatter_(2, (flat_ij - base.unsqueeze(1)).unsqueeze(1), math.inf)
        out = torch.cat([merged, dead], dim=1)  # the new rows (and, by symmetry, columns) i and j
        rows_of.index_copy_(0, flat_ij.view(-1), out.view(2 * b, w))
        # columns i, j of d and of blockmin, in one write
        store.put_(columns + flat_ij.unsqueeze(2), torch.cat([out, out.view(b, 2, blocks, g).amin(dim=-1)], dim=2))
        changed = flat_ij.view(-1) // g  # b * blocks + the row block of i (of j)
        blockmin_rows.index_copy_(0, changed, row_blocks.index_select(0, changed).view(2 * b, g, w).amin(dim=1))
        if linkage == "average":
            count.index_copy_(0, flat_i, pair_counts.sum(dim=1))
        absorbed.append(flat_ij)
    parent = torch.arange(b * w, device=dev)
    if absorbed:  # every cluster is absorbed once, so the parent pointers can be written after the loop
        pairs = torch.stack(absorbed).view(-1, 2)
        parent.index_copy_(0, pairs[:, 1], pairs[:, 0])
    root = _roots(parent, n).view(b, w)[:, :n] - base.unsqueeze(1)
    rank = (root == torch.arange(n, device=dev)).long().cumsum(dim=1) - 1
    return rank.gather(1, root)


@dataclass(frozen=True)
class ATC(MeanPosition, TokenOperator):
    """Agglomerative Token Clustering of the keys (see the module docstring)."""

    name = "atc"
    summary = "ATC: agglomerative clustering of the keys (cosine, average/complete/single linkage), size-weighted"
    merges = True
    default_prop_attn = True  # ATC's off-the-shelf patch (SSLBackbone_setup apply_patch) defaults to it

    linkage: Linkage = "average"

    def needs(self) -> frozenset[str]:
        return frozenset({KEYS})

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        assert ctx.keys is not None, "atc needs the block's keys"
        assignment = agglomerative_labels(cosine_distances(ctx.keys), k, self.linkage)
        tokens, sizes = pool_by_assignment(x, ctx.sizes, assignment, k)
        return Reduction(tokens, sizes, assignment)
