"""DPC-KNN (TCFormer, Zeng et al., CVPR 2022): density-peaks clustering of the tokens.

As reimplemented off the shelf in JoakimHaurum/TokenReduction (``models/dpcknn.py``) and ATC's
``ATC_Benchmark/models/dpcknn.py`` (``cluster_dpc_knn``, ``merge_tokens``), per image:

* distances ``d_ij = ||x_i - x_j|| / sqrt(C)`` between the patch tokens (``torch.cdist``);
* density ``rho_i = exp(-mean of d_ij^2 over the knn nearest tokens)``, the token itself (at
  distance 0) counted among them, plus a uniform noise below 1e-6 so that no two densities tie;
* distance indicator ``delta_i = min d_ij over the tokens j denser than i``; the densest token
  gets the largest distance in the image;
* the K tokens with the largest ``rho * delta`` are the centres (cluster c = the c-th largest),
  every token joins its nearest centre (first on ties), each centre its own cluster;
* each cluster becomes the weighted mean of its members, weights normalised by their sum + 1e-6,
  as ``merge_tokens``; sizes are summed.

The reference's noise is ``torch.rand``; here it is a counter-based draw (``hash_uniform``) of the
block's seed and the token index, the same for every image of the batch, so an image's output
never depends on its batch neighbours and compiled graphs stay pure (``ties="index"`` breaks
ties by the lower index instead, with no noise at all). The reference's learned token weights
(TCFormer's score layer, ``equal_weight=False``) do not exist off the shelf: ``weights="equal"``
is its ``equal_weight=True``; ``weights="size"`` weights by token size instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from ..errors import TpoolError
from .base import KEYS, MeanPosition, ReduceContext, Reduction, TokenOperator
from .common import flat_rows, gather_tokens, hash_uniform, squared_distances

NOISE = 1e-6  # the reference's tie-breaking noise amplitude


def token_distances(features: torch.Tensor) -> torch.Tensor:
    """B x N x C -> B x N x N float32 Euclidean distances over sqrt(C), as the reference.

    The reference's ``torch.cdist`` computes them, for more than 25 tokens, as
    sqrt(clamp(|x|^2 + |y|^2 - 2 x.y)) with one matmul; ``squared_distances`` is that formula
    without cdist's concatenated operands (a third faster on CPU), equal up to rounding.
    """
    f = features.float()
    return squared_distances(f, f).sqrt() / (f.shape[-1] ** 0.5)


def density_and_distance(dist: torch.Tensor, knn: int, noise: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-KNN's density rho and distance indicator delta (B x N each) from the distances.

    ``noise`` (broadcastable to B x N) is added to the density; without it, equal densities are
    ordered by index (the lower index counts as denser), the same strict order the noise aims at.
    """
    nearest = dist.topk(min(knn, dist.shape[-1]), dim=-1, largest=False).values
    density = torch.exp(-(nearest * nearest).mean(dim=-1))
    if noise is not None:
        density = density + noise
    higher = density.unsqueeze(1) > density.unsqueeze(2)  # [b, i, j]: j is denser than i
    if noise is None:
        n = dist.shape[-1]
        idx = torch.arange(n, device=dist.device)
        lower_index = idx.unsqueeze(0) < idx.unsqueeze(1)  # [i, j]: j < i
        higher = higher | ((density.unsqueeze(1) == density.unsqueeze(2)) & lower_index)
    dist_max = dist.flatten(1).amax(dim=1)[:, None, None]
    delta = torch.where(higher, dist, dist_max).amin(dim=-1)
    return density, delta


def dpc_knn_assignment(dist: torch.Tensor, k: int, knn: int, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """Cluster index in [0, k) of every token (B x N long): cluster c is the centre with the c-th largest score."""
    b = dist.shape[0]
    density, delta = density_and_distance(dist, knn, noise)
    centres = (density * delta).topk(k, dim=-1).indices  # B x k, largest score first
    to_centres = gather_tokens(dist, centres)  # B x k x N: the centres' rows
    assignment = to_centres.argmin(dim=1)
    return assignment.scatter(1, centres, torch.arange(k, device=dist.device).expand(b, k))


def weighted_merge(x: torch.Tensor, weights: torch.Tensor, assignment: torch.Tensor, k: int) -> torch.Tensor:
    """The reference's ``merge_tokens``: sum of x * w / (cluster weight + 1e-6), in float32 (B x k x C)."""
    b, n, c = x.shape
    index = flat_rows(assignment, k)
    w = weights.float().reshape(b * n)
    total = torch.zeros(b * k, device=x.device, dtype=torch.float32).index_add_(0, index, w) + 1e-6
    norm = (w / total.index_select(0, index)).unsqueeze(-1)
    out = torch.zeros(b * k, c, device=x.device, dtype=torch.float32)
    out.index_add_(0, index, x.float().reshape(b * n, c) * norm)
    return out.view(b, k, c).to(x.dtype)


@dataclass(frozen=True)
class DPCKNN(MeanPosition, TokenOperator):
    """Density-peaks clustering with k-nearest-neighbour density (see the module docstring)."""

    name = "dpcknn"
    summary = "DPC-KNN (TCFormer): density-peak centres by density x distance, nearest-centre merging"
    merges = True
    draws_random = True  # the tie-breaking noise (ties="noise") depends on the seed

    knn: int = 5
    features: Literal["tokens", "keys"] = "tokens"
    weights: Literal["equal", "size"] = "equal"
    ties: Literal["noise", "index"] = "noise"

    def __post_init__(self) -> None:
        if self.knn < 1:
            raise TpoolError(f"dpcknn: knn must be >= 1, got {self.knn}")

    def needs(self) -> frozenset[str]:
        return frozenset({KEYS}) if self.features == "keys" else frozenset()

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        feats = x if self.features == "tokens" else ctx.keys
        assert feats is not None, "dpcknn(features=keys) needs the block's keys"
        b, n, _ = x.shape
        noise = hash_uniform(ctx.seed, 1, n, x.device) * NOISE if self.ties == "noise" else None
        assignment = dpc_knn_assignment(token_distances(feats), k, self.knn, noise)
        weights = ctx.sizes if self.weights == "size" else torch.ones_like(ctx.sizes)
        tokens = weighted_merge(x, weights, assignment, k)
        sizes = torch.zeros(b, k, device=x.device, dtype=torch.float32).scatter_add_(1, assignment, ctx.sizes.float())
        return Reduction(tokens, sizes, assignment)
