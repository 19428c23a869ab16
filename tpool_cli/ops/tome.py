"""ToMe (Bolya et al., "Token Merging: Your ViT but Faster"): bipartite soft matching.

Within a block, the patch tokens are split alternately into A (even positions) and B (odd
positions). Each A token finds its most similar B token by cosine similarity of the block's keys
(averaged over heads); the r A tokens with the most similar matches are merged into their B
partner by size-weighted averaging (several A tokens may land on the same B token), the other A
tokens and all B tokens are kept. Output: the kept A tokens (original order), then the B tokens
(original order, merged ones included): N - r tokens, whose sizes sum to the input sizes.

Since every merge removes one A token, r is at most |A| = ceil(N / 2): a budget below floor(N/2)
in one block is not reachable (``realise`` says so, so planned counts are honest). ToMe's own
per-layer ``r`` schedule is given as one budget per block with ``--tokens`` (e.g. r = 13 on a
12-block model: 183,170,...,40). ToMe's paper also uses proportional attention (``--prop-attn``:
log(size) added to the attention logits after merging); it is a patch option, not part of the
operator. Prefix tokens never reach the operator (ToMe protects the class token the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .base import KEYS, ReduceContext, Reduction, TokenOperator
from .common import pool_by_assignment


def max_merges(n: int) -> int:
    """The most tokens one bipartite matching can remove from n: |A| = ceil(n/2), 0 without a B token."""
    return (n + 1) // 2 if n >= 2 else 0


def bipartite_assignment(keys: torch.Tensor, r: int) -> torch.Tensor:
    """Output index (B x N long, into N - r outputs) of every token under ToMe's matching.

    keys: B x N x D similarity features. Ties between equal similarities are broken by the lower
    index (stable sort; first maximum), so the result is deterministic.
    """
    b, n, _ = keys.shape
    k = keys.float()
    k = k / torch.linalg.vecdot(k, k).sqrt().clamp_min(1e-12).unsqueeze(-1)
    a_feat, b_feat = k[:, ::2], k[:, 1::2]
    n_a, n_b = a_feat.shape[1], b_feat.shape[1]
    scores = a_feat @ b_feat.transpose(1, 2)  # B x |A| x |B| cosine similarities
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=1, descending=True, stable=True)
    merged = torch.zeros(b, n_a, device=keys.device).scatter_(1, order[:, :r], 1.0) > 0  # (a bool fill breaks jit tracing)
    kept_a = n_a - r
    position = (~merged).long().cumsum(dim=1) - 1  # rank of each kept A token among the kept ones
    a_out = torch.where(merged, kept_a + partner, position)
    b_out = (kept_a + torch.arange(n_b, device=keys.device)).expand(b, n_b)
    assignment = torch.empty(b, n, dtype=torch.long, device=keys.device)
    assignment[:, ::2] = a_out
    assignment[:, 1::2] = b_out
    return assignment


@dataclass(frozen=True)
class ToMe(TokenOperator):
    """Token Merging by bipartite soft matching of the keys (see the module docstring)."""

    name = "tome"
    summary = "ToMe: merge the r most similar A-B pairs (bipartite matching of keys), size-weighted"
    merges = True

    def needs(self) -> frozenset[str]:
        return frozenset({KEYS})

    def realise(self, n: int, k: int, grid: Optional[tuple[int, int]]) -> int:
        k = max(1, min(k, n))
        return n - min(n - k, max_merges(n))

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        n = x.shape[1]
        r = n - self.realise(n, k, None)
        assert ctx.keys is not None, "tome needs the block's keys"
        assignment = bipartite_assignment(ctx.keys, r)
        tokens, sizes = pool_by_assignment(x, ctx.sizes, assignment, n - r)
        return Reduction(tokens, sizes, assignment)
