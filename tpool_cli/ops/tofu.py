"""ToFu (Kim et al., WACV 2024, "Token Fusion: Bridging the Gap between Token Pruning and Token Merging").

ToMe's bipartite matching on the block's keys (mean over heads), applied as pruning in the early
blocks and as merging with norm-preserving interpolation in the later ones. Following the
implementation in hchautran/PiToMe (``algo/tofu/merge.py``, ``algo/tofu/patch/timm.py``):

* The split is ToMe's over the whole sequence ``[prefix, patches]`` (A = even, B = odd positions),
  the prefix tokens never merging: patch j is in A when j + num_prefix is even. The r A tokens
  with the most similar B partners are the ones removed.
* Blocks 0 .. depth // 2 prune: the r A tokens are dropped (assignment -1, their sizes leave).
* Later blocks merge ("tofu" mode): each B token becomes the plain mean of itself and the A tokens
  matched to it, rescaled to the largest norm among them: ``mean / ||b|| * max_i ||x_i||``. The
  reference divides by the B token's *own* norm (``norm="reference"``); the paper's MLERP divides
  by the mean's norm, so the output norm is exactly the largest input norm (``norm="mlerp"``).
* Output: the kept A tokens (original order with prefix tokens, best match first without, as the
  reference), then the B tokens (original order).

The reference never updates token sizes in ToFu (its proportional attention therefore never
engages, and its mean is unweighted): ``weights="uniform"`` and ``default_prop_attn = False``
reproduce that; tpool still counts sizes (summed on merge) so source maps and sizes stay honest.
``weights="size"`` averages by size instead. r is at most n // 2 (``realise``), the size of A when
a class token leads the sequence. ``merges`` is False: in the pruning blocks sizes do not sum to N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from .base import KEYS, MeanPosition, ReduceContext, Reduction, TokenOperator, identity_reduction
from .common import gather_tokens, pool_by_assignment
from .tome import realise_bipartite


def sequence_split(n: int, num_prefix: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) patch indices of ToMe's alternate split of the whole sequence [prefix, patches].

    A holds the patches at even sequence positions (j + num_prefix even), B the odd ones.
    """
    start = num_prefix % 2
    return torch.arange(start, n, 2, device=device), torch.arange(1 - start, n, 2, device=device)


def matched_assignment(keys: torch.Tensor, r: int, num_prefix: int, prune: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(assignment B x N, merged B x N bool) of ToMe's matching with the sequence split.

    The r A tokens with the most similar B partners (cosine of the keys; ties: lower index first)
    go to their partner's slot (or -1 when pruning). Output slots: the kept A tokens, then the B
    tokens in order. The kept A tokens are in position order when the model has prefix tokens
    and best-match-first otherwise, as the reference (which sorts them back only with a class token).
    """
    bsz, n, _ = keys.shape
    device = keys.device
    a_idx, b_idx = sequence_split(n, num_prefix, device)
    n_a, n_b = a_idx.numel(), b_idx.numel()
    k = keys.float()
    k = k / torch.linalg.vecdot(k, k).sqrt().clamp_min(1e-12).unsqueeze(-1)
    start = num_prefix % 2  # strided views of the split, not index copies
    best, partner = (k[:, start::2] @ k[:, 1 - start :: 2].transpose(1, 2)).max(dim=-1)
    edge = best.argsort(dim=1, descending=True, stable=True)
    unm, src = edge[:, r:], edge[:, :r]
    if num_prefix:
        unm = unm.sort(dim=1).values
    slots = torch.arange(max(n_a, n_b), device=device).expand(bsz, -1)
    a_out = torch.empty(bsz, n_a, dtype=torch.long, device=device).scatter_(1, unm, slots[:, : n_a - r])
    src_out = torch.full_like(src, -1) if prune else partner.gather(1, src) + (n_a - r)
    a_out = a_out.scatter(1, src, src_out)
    assignment = torch.empty(bsz, n, dtype=torch.long, device=device)
    assignment[:, start::2] = a_out
    assignment[:, 1 - start :: 2] = (n_a - r) + slots[:, :n_b]
    merged_a = torch.zeros(bsz, n_a, device=device).scatter_(1, src, 1.0)
    merged = torch.zeros(bsz, n, device=device).index_copy_(1, a_idx, merged_a) > 0  # (a bool fill breaks jit tracing)
    return assignment, merged


def mlerp_rescale(
    tokens: torch.Tensor, x: torch.Tensor, assignment: torch.Tensor, merged: torch.Tensor, k: int, norm: str
) -> torch.Tensor:
    """Rescale each merged token to the largest norm of its members (ToFu's MLERP).

    ``norm="reference"`` divides by the norm of the group's kept member (the B token), as the
    reference code does; ``norm="mlerp"`` by the mean's own norm (the paper). Unmerged tokens keep
    a factor of exactly 1 in both.
    """
    bsz = x.shape[0]
    norms = torch.linalg.vector_norm(x.float(), dim=-1)  # B x N
    largest = torch.zeros(bsz, k, device=x.device).scatter_reduce_(1, assignment, norms, "amax", include_self=False)
    if norm == "mlerp":
        current = torch.linalg.vector_norm(tokens.float(), dim=-1)
    else:  # the kept member's own norm: merged sources go to a spare column k
        slot = torch.where(merged, k, assignment)
        current = torch.zeros(bsz, k + 1, device=x.device).scatter_(1, slot, norms)[:, :k]
    factor = largest / current.clamp_min(torch.finfo(torch.float32).tiny)
    return (tokens.float() * factor.unsqueeze(-1)).to(tokens.dtype)


@dataclass(frozen=True)
class ToFu(MeanPosition, TokenOperator):
    """ToMe matching that prunes early and merges with norm-preserving averaging later (module docstring)."""

    name = "tofu"
    summary = "ToFu: ToMe matching; prune in the first half of the blocks, MLERP merge (norm-preserving) after"
    merges = False  # prunes in the early blocks: sizes sum to N only where it merged
    default_prop_attn = False  # the reference never sets sizes, so its proportional attention never engages

    merge_start: Optional[int] = None  # first merging block; None = depth // 2 + 1, the reference's split
    norm: Literal["reference", "mlerp"] = "reference"  # reference: mean / ||b|| * max norm; mlerp: the paper's
    weights: Literal["uniform", "size"] = "uniform"  # uniform: the reference's plain mean

    def needs(self) -> frozenset[str]:
        return frozenset({KEYS})

    def realise(self, n: int, k: int, grid: Optional[tuple[int, int]]) -> int:
        return realise_bipartite(n, k)

    def prunes(self, layer: int, depth: int) -> bool:
        """Whether block ``layer`` prunes (True) or merges: the reference prunes blocks 0 .. depth // 2."""
        start = depth // 2 + 1 if self.merge_start is None else self.merge_start
        return layer < start

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        b, n, _ = x.shape
        r = n - self.realise(n, k, None)
        if r == 0:  # static (shapes only): nothing to remove
            return identity_reduction(x, ctx)
        assert ctx.keys is not None, "tofu needs the block's keys"
        k = n - r
        prune = self.prunes(ctx.layer, ctx.depth)
        assignment, merged = matched_assignment(ctx.keys, r, ctx.num_prefix, prune)
        if prune:
            slot = torch.where(assignment >= 0, assignment, k)
            index = torch.zeros(b, k + 1, dtype=torch.long, device=x.device)
            index = index.scatter_(1, slot, torch.arange(n, device=x.device).expand(b, n))[:, :k]
            return Reduction(gather_tokens(x, index), torch.gather(ctx.sizes, 1, index), assignment)
        weights = torch.ones_like(ctx.sizes) if self.weights == "uniform" else None
        tokens, sizes = pool_by_assignment(x, ctx.sizes, assignment, k, weights)
        return Reduction(mlerp_rescale(tokens, x, assignment, merged, k, self.norm), sizes, assignment)
