"""Token Pooling (Marin et al.): replace N tokens by K cluster centers that best reconstruct them.

The objective is the weighted (asymmetric Chamfer) reconstruction error

    E(Y) = sum_i w_i * min_k ||f_i - y_k||^2

over the features f_i being clustered (the block's tokens, or its keys), with w_i = size_i for
``kmeans``/``kmedoids`` (a token that already stands for s patches counts s times) and
w_i = significance_i * size_i for the weighted variants ``wkmeans``/``wkmedoids``. A few
alternating iterations (assign every token to its nearest center, then recompute the centers)
decrease E monotonically from an initialisation: the K most significant tokens (default) or
greedy farthest-point sampling.

* K-Means (Lloyd): a center is the w-weighted mean of its members.
* K-Medoids: a center is the member m minimising sum_{j in its cluster} w_j ||f_j - f_m||^2.
  For squared Euclidean distance that cost is S_c ||f_m - mu_c||^2 + const_c (S_c the cluster's
  weight sum, mu_c its weighted mean), so the medoid is the member nearest to the weighted mean:
  O(N * D) per iteration with scatter ops, no N x N matrix.

Every step is batched over images and clusters (argmin, scatter-add, scatter-amin); the only
Python loop is over the few iterations (and over the K seeds of the farthest-point init, which is
sequential by nature). Nothing reads a tensor value on the host, so the forward can be captured by
torch.compile / CUDA graphs. Features are centred per image first (distances are translation
invariant) and distances are computed in float32 with autocast disabled: the matmul form
||y||^2 - 2 x.y would otherwise lose the small differences between tokens that share a large
common component, and bf16 assignments would turn into noise.

Empty clusters (no member with positive weight; with distinct seeds this needs ties or a center
that lost all its members) keep their previous center, deterministically. The output token of a
cluster is its center (the mean or the medoid token); with ``features="keys"`` the output is the
w-weighted mean (or the medoid) of the block's *tokens* under the key clustering, and an empty
K-Means cluster outputs the token it was seeded from. Output sizes are the summed member sizes
(0 for an empty cluster), so they keep counting original patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch

from ..errors import TpoolError
from .base import KEYS, SIGNIFICANCE, MeanPosition, ReduceContext, Reduction, TokenOperator
from .common import gather_tokens, pool_by_assignment, squared_distances

# Significance below this is treated as this (only reachable by underflow): keeps every weight > 0
# for tokens of positive size, so a cluster is empty exactly when its members stand for no patch.
MIN_SIGNIFICANCE = 1e-20
# Medoid candidates whose cost is within this relative margin of the best count as tied, and ties go to
# the lowest token index: exact ties (a two-member cluster of equal weights) then do not depend on rounding.
MEDOID_TIE_RTOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Pure tensor functions (batched over images; f: B x N x D float32, w: B x N float32)
# ---------------------------------------------------------------------------------------------


def clustering_weights(sizes: torch.Tensor, significance: Optional[torch.Tensor]) -> torch.Tensor:
    """w_i = size_i (unweighted, significance None) or size_i * significance_i (weighted)."""
    w = sizes.float()
    if significance is not None:
        w = w * significance.float().clamp_min(MIN_SIGNIFICANCE)
    return w


def significance_init(significance: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B x K, ascending) of the K most significant tokens: the seeds of Token Pooling."""
    return significance.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def farthest_init(f: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B x K, ascending) of K seeds by greedy weighted farthest-point sampling.

    The first seed is the token nearest to the weighted mean (the best single center); each next
    seed is the token contributing most to the current objective, argmax_i w_i * min_s ||f_i - f_s||^2
    (plain farthest-point sampling when the weights are equal). Sequential by nature: the pairwise
    distances are computed once (N x N x D MACs, one matmul) so that each of the K steps is only a
    row lookup, a minimum and an argmax over B x N. Ties go to the lowest index.
    """
    b, n, _ = f.shape
    wsum = w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    mean = (w.unsqueeze(1) @ f) / wsum.unsqueeze(-1)  # B x 1 x D
    first = squared_distances(f, mean).squeeze(-1).argmin(dim=1)
    rows = squared_distances(f, f).reshape(b * n, n)  # row i*n + j: distances of token j of image i
    offsets = torch.arange(b, device=f.device) * n
    seeds = [first]
    gain = w * rows.index_select(0, first + offsets)  # w_i * min_s ||f_i - f_s||^2, B x N
    for step in range(1, k):
        nxt = gain.argmax(dim=1)
        seeds.append(nxt)
        if step < k - 1:
            gain = torch.minimum(gain, w * rows.index_select(0, nxt + offsets))
    return torch.stack(seeds, dim=1).sort(dim=1).values


def assign(f: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Nearest center of every token (B x N long); ties go to the lowest center index.

    argmin_k ||f_i - y_k||^2 = argmin_k (||y_k||^2 - 2 f_i.y_k): ||f_i||^2 is the same for every k,
    so one fused baddbmm (K x N x D MACs) gives the scores, with no clamp or extra N x K passes.
    """
    f, centers = f.float(), centers.float()
    y_sq = torch.linalg.vecdot(centers, centers).unsqueeze(1)  # B x 1 x K
    return torch.baddbmm(y_sq, f, centers.transpose(1, 2), alpha=-2.0).argmin(dim=-1)


def objective(f: torch.Tensor, w: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """sum_i w_i min_k ||f_i - y_k||^2 per image (B,)."""
    return (w * squared_distances(f, centers).min(dim=-1).values).sum(dim=1)


def kmeans_step(
    f: torch.Tensor, w: torch.Tensor, centers: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Lloyd iteration: assign, then move each center to its members' w-weighted mean.

    Returns (assignment B x N, new centers B x K x D, cluster weight sums B x K). A cluster with
    zero weight keeps its previous center.
    """
    k = centers.shape[1]
    a = assign(f, centers)
    means, wsum = pool_by_assignment(f, w, a, k)
    return a, torch.where((wsum > 0).unsqueeze(-1), means, centers), wsum


def kmeans(
    f: torch.Tensor, w: torch.Tensor, seeds: torch.Tensor, iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted Lloyd K-Means from the seed tokens: (assignment, centers, cluster weight sums)."""
    centers = gather_tokens(f, seeds)
    a, wsum = None, None
    for _ in range(iters):
        a, centers, wsum = kmeans_step(f, w, centers)
    assert a is not None and wsum is not None, "iters must be >= 1"
    return a, centers, wsum


def medoid_update(f: torch.Tensor, w: torch.Tensor, a: torch.Tensor, medoids: torch.Tensor) -> torch.Tensor:
    """New medoid index of every cluster (B x K): the member nearest to the cluster's weighted mean.

    Equivalent to argmin over members m of sum_{j in cluster} w_j ||f_j - f_m||^2 (see the module
    docstring), in O(N * D) with scatter ops. Ties (within ``MEDOID_TIE_RTOL``) go to the lowest token
    index; a cluster with zero weight keeps its previous medoid.
    """
    b, n = a.shape
    k = medoids.shape[1]
    mu, wsum = pool_by_assignment(f, w, a, k)  # weighted means B x K x D, weight sums B x K
    diff = f - gather_tokens(mu, a)
    cost = torch.linalg.vecdot(diff, diff)  # ||f_i - mu_{a_i}||^2, B x N
    inf = torch.full((b, k), float("inf"), device=f.device, dtype=cost.dtype)
    best = inf.scatter_reduce(1, a, cost, reduce="amin", include_self=True)
    index = torch.arange(n, device=f.device).expand(b, n)
    # near-ties (float32 rounding: e.g. the two members of a pair around their midpoint) go to the lowest index
    candidate = torch.where(cost <= best.gather(1, a) * (1.0 + MEDOID_TIE_RTOL), index, n)
    chosen = torch.full((b, k), n, device=f.device, dtype=torch.long).scatter_reduce(1, a, candidate, reduce="amin")
    return torch.where((wsum > 0) & (chosen < n), chosen, medoids)


def kmedoids(f: torch.Tensor, w: torch.Tensor, seeds: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted K-Medoids (alternating assignment / medoid update) from the seeds: (assignment, medoid indices)."""
    medoids = seeds
    a = None
    for _ in range(iters):
        a = assign(f, gather_tokens(f, medoids))
        medoids = medoid_update(f, w, a, medoids)
    assert a is not None, "iters must be >= 1"
    return a, medoids


def summed_sizes(sizes: torch.Tensor, a: torch.Tensor, k: int) -> torch.Tensor:
    """Sizes of the K clusters: summed member sizes (float32, B x K)."""
    return torch.zeros(a.shape[0], k, device=sizes.device, dtype=torch.float32).scatter_add_(1, a, sizes.float())


# ---------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Clustering(TokenOperator):
    """Shared options and forward of the four Token Pooling operators (see the module docstring)."""

    merges = True
    autocast = False  # float32 distances whatever the caller's autocast (see the module docstring)
    weighted: ClassVar[bool] = False
    medoids: ClassVar[bool] = False

    iters: int = 5
    init: Literal["significance", "farthest"] = "significance"
    features: Literal["tokens", "keys"] = "tokens"

    def __post_init__(self) -> None:
        if not isinstance(self.iters, int) or self.iters < 1:
            raise TpoolError(f"{self.name}: iters must be an integer >= 1, got {self.iters!r}")

    def needs(self) -> frozenset[str]:
        needs = set()
        if self.weighted or self.init == "significance":
            needs.add(SIGNIFICANCE)
        if self.features == "keys":
            needs.add(KEYS)
        return frozenset(needs)

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        source = ctx.keys if self.features == "keys" else x
        assert source is not None, f"{self.name} needs the block's keys"
        # Distances do not change under translation: centring removes the component all tokens share
        # (large in ViTs), so the matmul form ||y||^2 - 2 f.y does not cancel away the differences.
        offset = source.float().mean(dim=1, keepdim=True)
        f = source.float() - offset
        if self.weighted or self.init == "significance":
            assert ctx.significance is not None, f"{self.name} needs significance scores"
        w = clustering_weights(ctx.sizes, ctx.significance if self.weighted else None)
        seeds = significance_init(ctx.significance, k) if self.init == "significance" else farthest_init(f, w, k)  # type: ignore[arg-type]

        representative = None
        if self.medoids:
            a, medoids = kmedoids(f, w, seeds, self.iters)
            tokens = gather_tokens(x, medoids)
            sizes = summed_sizes(ctx.sizes, a, k)
            representative = medoids
        else:
            a, centers, wsum = kmeans(f, w, seeds, self.iters)
            if self.features == "tokens":
                tokens = (centers + offset).to(x.dtype)
                sizes = wsum if not self.weighted else summed_sizes(ctx.sizes, a, k)
            else:
                pooled, sizes = pool_by_assignment(x, ctx.sizes, a, k, weights=w if self.weighted else None)
                tokens = torch.where((wsum > 0).unsqueeze(-1), pooled, gather_tokens(x, seeds))
        return Reduction(tokens, sizes, a, representative=representative)


@dataclass(frozen=True)
class KMeans(MeanPosition, _Clustering):
    """Token Pooling with K-Means: tokens are replaced by size-weighted cluster means."""

    name = "kmeans"
    summary = "Token Pooling: K-Means (Lloyd) cluster means, seeded by significance"


@dataclass(frozen=True)
class KMedoids(_Clustering):
    """Token Pooling with K-Medoids: tokens are replaced by the medoid token of each cluster."""

    name = "kmedoids"
    summary = "Token Pooling: K-Medoids, a member token per cluster, seeded by significance"
    medoids = True


@dataclass(frozen=True)
class WeightedKMeans(MeanPosition, _Clustering):
    """K-Means with weights significance x size (the seed paper's weighted clustering)."""

    name = "wkmeans"
    summary = "Token Pooling: K-Means weighted by significance x size"
    weighted = True


@dataclass(frozen=True)
class WeightedKMedoids(_Clustering):
    """K-Medoids with weights significance x size."""

    name = "wkmedoids"
    summary = "Token Pooling: K-Medoids weighted by significance x size"
    weighted = True
    medoids = True
