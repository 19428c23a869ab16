"""ToMe (Bolya et al., "Token Merging: Your ViT but Faster"): bipartite soft matching, as ToMe's code does it.

Follows facebookresearch/ToMe ``tome/merge.py`` ``bipartite_soft_matching`` and ``merge_wavg``
(commit af95e4b) step for step, on the patch tokens the patch hands over:

* The split alternates over the *whole* sequence [prefix tokens, patches]: A = even positions,
  B = odd positions, so with one prefix token (DeiT, ViT, CLIP) the A patches are those at odd
  patch index, with two (distilled DeiT) those at even index. ``ctx.num_prefix`` gives the parity.
* Prefix tokens are never merged: ToMe gives the class token's row (first A) and the
  distillation token's column (first B) score -inf; here every prefix row of A and column of B
  is -inf (registers too), and the scores are laid out exactly as ToMe's, prefix rows and columns
  included, so its argsort sees the same values in the same places.
* Each A token's best B partner is ``scores.max(-1)`` (cosine similarity of the keys, mean over
  heads); the r A tokens with the highest best score (``argsort(descending=True)``, ToMe's call)
  are merged into their partners, size-weighted (``merge_wavg``). At most floor(patch tokens / 2)
  per block: ToMe's cap floor((tokens - protected) / 2) (``realise`` reports it).
* Output order is ToMe's: the unmerged A tokens (sorted back into sequence order when there is a
  prefix token, as ToMe sorts them with a class token; in score order without one), then every
  B token in order. The next block's split parity depends on this order.
* Each output names its representative (``Reduction.representative``): an unmerged A token is
  itself, a B token is ToMe's destination, so a merged token keeps the destination's rope
  position (ToMe's code has no positions to follow; the destination is the token that stays);
  ``position="mean"`` gives it the size-weighted mean position instead (rope evaluated there).

Differences that are rounding only: unit keys as k / sqrt(k . k) (one fused op the FLOP count
sees) against ToMe's k / ||k||, and the weighted sums' accumulation order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from .base import KEY_WHEN_SET, KEYS, ReduceContext, Reduction, TokenOperator
from .common import pool_by_assignment


def max_merges(n: int) -> int:
    """The most tokens one matching removes from n patch tokens: ToMe's floor((tokens - protected) / 2)."""
    return n // 2


def realise_bipartite(n: int, k: int) -> int:
    """Tokens out of a bipartite matching asked for k of n: at most :func:`max_merges` removed.

    The ``realise`` of every operator that merges by one A-B matching per block (ToMe, PiToMe,
    ToFu, MCTF), whose references all cap r at half the tokens.
    """
    k = max(1, min(k, n))
    return n - min(n - k, max_merges(n))


def _split_scores(keys: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, int, int, int]:
    """ToMe's A x B score matrix over the whole sequence (prefix rows/columns -inf).

    Returns (scores B x |A| x |B| with the prefix included, parity of the first A patch, prefix
    tokens in A, prefix tokens in B).
    """
    k = keys.float()
    k = k / torch.linalg.vecdot(k, k).sqrt().clamp_min(1e-12).unsqueeze(-1)  # (the clamp only acts on a zero key)
    first = num_prefix % 2  # patch j sits at sequence position num_prefix + j; A = even positions
    scores = k[:, first::2] @ k[:, 1 - first :: 2].transpose(1, 2)
    pa, pb = (num_prefix + 1) // 2, num_prefix // 2
    if pa or pb:
        scores = F.pad(scores, (pb, 0, pa, 0), value=float("-inf"))
    return scores, first, pa, pb


def bipartite_assignment(keys: torch.Tensor, r: int, num_prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's matching: (assignment, representative).

    assignment: output index (B x N long, into N - r outputs) of every patch token.
    representative: input index (B x (N - r) long) of the token each output stands in for: an
    unmerged A token is itself, a B token (merged into or not) is ToMe's destination, itself, so
    side tensors that follow a representative (rope positions) take the destination's.

    keys: B x N x D similarity features of the patch tokens; ``num_prefix`` tokens precede them in
    the block's sequence; 1 <= r <= N // 2.
    """
    b, n, _ = keys.shape
    scores, first, pa, pb = _split_scores(keys, num_prefix)
    n_a, n_b = (n + 1 - first) // 2, (n + first) // 2  # A and B patch tokens
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    src_idx = edge_idx[:, :r]  # merged A rows (prefix rows are -inf: never among the first r)
    unm_idx = edge_idx[:, r:]
    if num_prefix:
        unm_idx = unm_idx.sort(dim=1).values  # as ToMe with a class token: sequence order, prefix first
    unm_idx = unm_idx[:, pa:] - pa  # patch A tokens only (the -inf prefix rows sorted first), as patch A indices
    dst_idx = node_idx.gather(1, src_idx) - pb  # partner B patch index of each merged A token
    kept_a = n_a - r
    a_out = torch.empty(b, n_a, dtype=torch.long, device=keys.device)
    a_out.scatter_(1, unm_idx, torch.arange(kept_a, device=keys.device).expand(b, kept_a))
    a_out.scatter_(1, src_idx - pa, kept_a + dst_idx)
    assignment = torch.empty(b, n, dtype=torch.long, device=keys.device)
    assignment[:, first::2] = a_out
    assignment[:, 1 - first :: 2] = (kept_a + torch.arange(n_b, device=keys.device)).expand(b, n_b)
    b_in = (1 - first + 2 * torch.arange(n_b, device=keys.device)).expand(b, n_b)  # input index of each B token
    representative = torch.cat([first + 2 * unm_idx, b_in], dim=1)  # ToMe's output order: unmerged A, then B
    return assignment, representative


@dataclass(frozen=True)
class ToMe(TokenOperator):
    """Token Merging by bipartite soft matching of the keys (see the module docstring)."""

    name = "tome"
    summary = "ToMe: merge the r most similar A-B pairs (bipartite matching of keys), size-weighted"
    merges = True
    default_prop_attn = True  # ToMe's apply_patch(prop_attn=True)
    # rope models only: a merged token's position is its destination's (ToMe's token that stays),
    # or the size-weighted mean of the pair ("mean", rope evaluated there; "nearest": the nearer member's)
    position: Literal["destination", "mean", "nearest"] = field(default="destination", metadata=KEY_WHEN_SET)

    def needs(self) -> frozenset[str]:
        return frozenset({KEYS})

    def realise(self, n: int, k: int, grid: Optional[tuple[int, int]]) -> int:
        return realise_bipartite(n, k)

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        n = x.shape[1]
        r = n - self.realise(n, k, None)
        assert ctx.keys is not None, "tome needs the block's keys"
        assignment, representative = bipartite_assignment(ctx.keys, r, ctx.num_prefix)
        tokens, sizes = pool_by_assignment(x, ctx.sizes, assignment, n - r)
        return Reduction(tokens, sizes, assignment, representative=representative)
