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


def _lance_williams(di: torch.Tensor, dj: torch.Tensor, ni: torch.Tensor, nj: torch.Tensor, linkage: str) -> torch.Tensor:
    """Distances of the merged cluster i+j to every cluster, from those of i and j (B x N each).

    ni, nj: B x 1 member counts. +inf (dead rows, the diagonal) stays +inf in every linkage
    except single, whose caller masks it.
    """
    if linkage == "average":
        return (ni * di + nj * dj) / (ni + nj)  # scipy's formula and order of operations
    if linkage == "complete":
        return torch.maximum(di, dj)
    return torch.minimum(di, dj)


def _roots(parent: torch.Tensor) -> torch.Tensor:
    """Follow parent pointers (B x N, parent <= index) to the root of every token by pointer jumping."""
    for _ in range(max(1, math.ceil(math.log2(parent.shape[1])))):
        parent = parent.gather(1, parent)
    return parent


def agglomerative_labels(dist: torch.Tensor, k: int, linkage: str = "average") -> torch.Tensor:
    """Cluster index in [0, k) of every point (B x N long) after agglomerating to k clusters.

    dist: B x N x N symmetric distances (the diagonal is ignored), in the dtype the merges run in
    (float32 in the operator; float64 reproduces scipy's arithmetic). Clusters are numbered in
    the order of their lowest member. N - k sequential steps of batched work, no host sync, no
    loop over images; equal distances go to the pair first in row-major order (i < j).

    Finding the closest pair by an argmin over the whole matrix costs N^2 per step; instead the
    columns are cut into blocks of g ~ sqrt(N) and the minimum of every (block, row) is kept
    (``blockmin``, B x blocks x N). A merge changes only rows and columns i and j, so a step
    recomputes the block minima of rows i, j and of the two column blocks holding i and j (by
    symmetry, the minima over g contiguous rows): O(N sqrt(N)) per step, exact for any linkage.
    """
    b, n, _ = dist.shape
    dev, dtype = dist.device, dist.dtype
    g = max(1, math.isqrt(n - 1) + 1)  # block width ~ sqrt(N)
    blocks = -(-n // g)
    w = blocks * g  # rows and columns padded with +inf up to whole blocks
    d = torch.full((b, w, w), math.inf, dtype=dtype, device=dev)
    d[:, :n, :n] = dist.masked_fill(torch.eye(n, dtype=torch.bool, device=dev), math.inf)
    rows_of = d.view(b * w, w)
    blockmin = d.view(b, blocks, g, w).amin(dim=2)  # [b, block, k]: min of column k over the block's rows
    count = torch.ones(b, n, dtype=dtype, device=dev)
    parent = torch.arange(n, device=dev).expand(b, n).contiguous()
    base, block_base = torch.arange(b, device=dev) * w, torch.arange(b, device=dev) * blocks
    dead = torch.full((b, w), math.inf, dtype=dtype, device=dev)
    for _ in range(n - k):
        i = blockmin.amin(dim=1).argmin(dim=1)  # first row holding the minimum: the lower index of the pair
        row_i = rows_of.index_select(0, base + i)
        j = row_i.argmin(dim=1)
        row_j = rows_of.index_select(0, base + j)
        ij = torch.stack([i, j], dim=1)  # B x 2
        counts = count.gather(1, ij)
        new = _lance_williams(row_i, row_j, counts[:, :1], counts[:, 1:], linkage).scatter(1, ij, math.inf)
        rows_of.index_copy_(0, torch.stack([base + i, base + j], dim=1).view(-1), torch.stack([new, dead], dim=1).view(2 * b, w))
        d.scatter_(2, ij.unsqueeze(1).expand(b, w, 2), torch.stack([new, dead], dim=2))
        # block minima of the two changed column blocks (= row blocks, by symmetry), then of rows i, j
        changed = (torch.stack([i // g, j // g], dim=1) + block_base.unsqueeze(1)).view(-1)
        fresh = d.view(b * blocks, g * w).index_select(0, changed).view(2 * b, g, w).amin(dim=1)
        blockmin.view(b * blocks, w).index_copy_(0, changed, fresh)
        own = torch.stack([new.view(b, blocks, g).amin(dim=-1), dead[:, :blocks]], dim=2)  # B x blocks x 2
        blockmin.scatter_(2, ij.unsqueeze(1).expand(b, blocks, 2), own)
        count.scatter_add_(1, i.unsqueeze(1), counts[:, 1:])
        parent.scatter_(1, j.unsqueeze(1), i.unsqueeze(1))
    root = _roots(parent)
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
