"""Pruning baselines: keep K tokens, drop the rest (no averaging, sizes of kept tokens unchanged)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from .base import CLS_ATTN, SIGNIFICANCE, ReduceContext, Reduction, TokenOperator, identity_reduction
from .common import gather_tokens, hash_uniform, kept_assignment, kept_index


def prune(x: torch.Tensor, k: int, ctx: ReduceContext, scores: torch.Tensor) -> Reduction:
    """Keep the k highest-scoring tokens in their original order; each is its own representative."""
    index = kept_index(scores, k)
    return Reduction(
        gather_tokens(x, index), torch.gather(ctx.sizes, 1, index), kept_assignment(index, x.shape[1]), representative=index
    )


@dataclass(frozen=True)
class NoReduction(TokenOperator):
    """The baseline: never reduces, whatever the schedule says."""

    name = "none"
    summary = "baseline, no token reduction"

    def realise(self, n: int, k: int, grid: Optional[tuple[int, int]]) -> int:
        return n

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:  # never called (realise says n)
        return identity_reduction(x, ctx)


@dataclass(frozen=True)
class TopK(TokenOperator):
    """Score-based pruning: keep the K tokens with the highest attention score.

    ``score="cls"`` (default, as EViT and DynamicViT's baseline): attention from the class token,
    mean over heads; needs only the class-token row of the attention, so the block keeps fused
    attention. ``score="received"`` (PoWER-BERT significance): attention each token receives,
    summed over heads and all queries; needs the full attention matrix in reducing blocks.
    """

    name = "topk"
    summary = "keep the K tokens with the highest attention (class-token or received)"
    score: Literal["cls", "received"] = "cls"

    def needs(self) -> frozenset[str]:
        return frozenset({CLS_ATTN if self.score == "cls" else SIGNIFICANCE})

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        return prune(x, k, ctx, ctx.feature(CLS_ATTN if self.score == "cls" else SIGNIFICANCE))


@dataclass(frozen=True)
class RandomSelect(TokenOperator):
    """Keep K tokens chosen uniformly at random (seeded by ``--seed``).

    The draw is a pure function of (seed, block, image's place in the batch, token position)
    (:func:`hash_uniform`), so a forward is deterministic, does not depend on earlier forwards, and
    compiles with ``torch.compile(fullgraph=True)`` (a ``torch.Generator`` cannot be traced).
    """

    name = "random"
    summary = "keep K tokens chosen uniformly at random (seeded)"
    draws_random = True

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        return prune(x, k, ctx, hash_uniform(ctx.seed, x.shape[0], x.shape[1], x.device))
