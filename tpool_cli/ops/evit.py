"""EViT (Liang et al., "Not All Patches are What You Need"): keep the attentive tokens, fuse the rest.

Follows youweiliang/evit ``evit.py`` (``Attention.forward`` and ``Block.forward`` with
``fuse_token=True``, commit 5ca95a7):

* Token counts: at a reducing block with n patch tokens in (a fused token from an earlier block
  counts as one of them), EViT keeps ``ceil(keep_rate * n)`` tokens by class-token attention
  (``attn[:, :, 0, 1:]`` averaged over heads) and fuses the rest into one token appended last:
  ceil(keep * n) + 1 tokens out (196 at keep 0.7 in blocks 3, 6, 9: 139, 99, 71). ``keep_target``
  gives these counts, so ``--keep`` means EViT's keep rate for this operator. With ``--tokens`` or
  ``--r`` the operator keeps K - 1 and fuses the rest into the K-th.
* ``fuse="sum"`` (default, EViT's): the fused token is sum_i a_i x_i over the inattentive tokens,
  a_i their class attention as it is (a softmax over all tokens, not renormalised over the fused
  ones). ``fuse="mean"``: tpool's earlier fusion, the average weighted by attention x size (sizes
  sum to one over the fused tokens, attention below 1e-20 counts as 1e-20 so it is always defined).
* The fused token's size (for proportional attention, off by default as in EViT, which has no
  sizes, and for source maps) is the sum of the fused tokens' sizes: it stands for those patches.

Kept tokens stay in their original order (EViT orders them by attention, ``topk(sorted=True)``):
a ViT block is permutation-equivariant, so the logits are the same up to rounding, and tpool's
grid-ordered source maps stay readable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .base import CLS_ATTN, MeanPosition, ReduceContext, Reduction, TokenOperator
from .common import gather_tokens

MIN_ATTENTION = 1e-20


def keep_and_fuse(
    x: torch.Tensor, sizes: torch.Tensor, attention: torch.Tensor, k: int, fuse: str = "sum"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens B x K x C, sizes B x K, assignment B x N) of EViT's keep-top-(K-1)-and-fuse, K < N."""
    b, n, _ = x.shape
    keep = k - 1
    index = attention.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values  # B x (K-1)
    dropped = torch.ones(b, n, device=x.device).scatter_(1, index, 0.0) > 0  # (a bool fill breaks jit tracing)
    if fuse == "sum":  # EViT: sum_i a_i x_i, the attention as it is
        fused = torch.where(dropped, attention.float(), 0.0).unsqueeze(1) @ x.float()
    else:
        w = torch.where(dropped, sizes.float() * attention.float().clamp_min(MIN_ATTENTION), 0.0)  # B x N
        fused = (w.unsqueeze(1) @ x.float()) / w.sum(dim=1).clamp_min(torch.finfo(torch.float32).tiny)[:, None, None]
    fused_size = torch.where(dropped, sizes.float(), 0.0).sum(dim=1, keepdim=True)
    tokens = torch.cat([gather_tokens(x, index), fused.to(x.dtype)], dim=1)
    out_sizes = torch.cat([torch.gather(sizes.float(), 1, index), fused_size], dim=1)
    rank = torch.arange(keep, device=x.device).expand(b, keep)
    assignment = torch.full((b, n), keep, dtype=torch.long, device=x.device).scatter_(1, index, rank)
    return tokens, out_sizes, assignment


def evit_tokens(n: int, keep: float) -> int:
    """Patch tokens out of an EViT block with n in at keep rate ``keep``: ceil(keep * n) + the fused one.

    The same float expression as EViT's ``math.ceil(keep_rate * (N - 1))`` (N counts the class
    token), so the counts agree bit for bit; n when nothing would be removed.
    """
    return min(n, math.ceil(keep * n) + 1)


@dataclass(frozen=True)
class EViT(MeanPosition, TokenOperator):
    """Keep the top K-1 tokens by class-token attention, fuse the others into one."""

    name = "evit"
    summary = "EViT: keep the most attended tokens (class attention), fuse the rest into one"
    merges = True
    fuse: Literal["sum", "mean"] = "sum"  # sum: EViT's sum_i a_i x_i; mean: attention x size weighted mean

    def needs(self) -> frozenset[str]:
        return frozenset({CLS_ATTN})

    def keep_target(self, n: int, keep: float, target: int) -> int:
        return evit_tokens(n, keep)

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        assert ctx.cls_attn is not None, "evit needs the class-token attention"
        tokens, sizes, assignment = keep_and_fuse(x, ctx.sizes, ctx.cls_attn, k, self.fuse)
        return Reduction(tokens, sizes, assignment)
