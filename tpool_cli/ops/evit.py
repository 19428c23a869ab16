"""EViT (Liang et al., "Not All Patches are What You Need"): keep the attentive tokens, fuse the rest.

Keep the K - 1 patch tokens the class token attends to most (class-token attention, mean over
heads, as in EViT) in their original order, and fuse all the other ones into a single token
appended last: their average weighted by attention x size (EViT weights by attention; the size
factor makes a fused token that already stands for several patches count for them). The output
has K tokens and the sizes sum to the input sizes (the fused token's size is the dropped sizes'
sum). Attention below 1e-20 counts as 1e-20, so the fused token is defined even if the dropped
tokens got no attention at all (then it is their size-weighted mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CLS_ATTN, ReduceContext, Reduction, TokenOperator
from .common import gather_tokens

MIN_ATTENTION = 1e-20


def keep_and_fuse(
    x: torch.Tensor, sizes: torch.Tensor, attention: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens B x K x C, sizes B x K, assignment B x N) of EViT's keep-top-(K-1)-and-fuse, K < N."""
    b, n, _ = x.shape
    keep = k - 1
    index = attention.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values  # B x (K-1)
    dropped = torch.ones(b, n, device=x.device).scatter_(1, index, 0.0) > 0  # (a bool fill breaks jit tracing)
    w = torch.where(dropped, sizes.float() * attention.float().clamp_min(MIN_ATTENTION), 0.0)  # B x N
    fused = (w.unsqueeze(1) @ x.float()) / w.sum(dim=1).clamp_min(torch.finfo(torch.float32).tiny)[:, None, None]
    fused_size = torch.where(dropped, sizes.float(), 0.0).sum(dim=1, keepdim=True)
    tokens = torch.cat([gather_tokens(x, index), fused.to(x.dtype)], dim=1)
    out_sizes = torch.cat([torch.gather(sizes.float(), 1, index), fused_size], dim=1)
    rank = torch.arange(keep, device=x.device).expand(b, keep)
    assignment = torch.full((b, n), keep, dtype=torch.long, device=x.device).scatter_(1, index, rank)
    return tokens, out_sizes, assignment


@dataclass(frozen=True)
class EViT(TokenOperator):
    """Keep the top K-1 tokens by class-token attention, fuse the others into one."""

    name = "evit"
    summary = "EViT: keep the K-1 most attended tokens (class attention), fuse the rest into one"
    merges = True

    def needs(self) -> frozenset[str]:
        return frozenset({CLS_ATTN})

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        assert ctx.cls_attn is not None, "evit needs the class-token attention"
        tokens, sizes, assignment = keep_and_fuse(x, ctx.sizes, ctx.cls_attn, k)
        return Reduction(tokens, sizes, assignment)
