"""PiToMe (Tran et al., NeurIPS 2024, "Accelerating Transformers with Spectrum-Preserving Token Merging").

Every patch token gets an energy score from the cosine similarities of the block's keys (mean over
heads): ``E_i = mean_j elu(cos(k_i, k_j) - margin, alpha)``. A token with high energy sits in a
large group of similar tokens (it is redundant); a token with low energy is isolated, that is
informative. The tokens are ordered by energy, highest first, and the merging happens among the
high-energy ones, following the reference (hchautran/PiToMe, ``algo/pitome/merge.py``):

* ``pitome`` blocks: the 2r highest-energy tokens are split alternately in energy order (A = ranks
  0, 2, 4..., B = ranks 1, 3, 5...), every A token is merged into its most similar B token; the
  n - 2r lowest-energy tokens are protected, kept as they are. Output: the protected tokens (energy
  order), then the B tokens.
* ``bsm`` blocks ("pitome_bsm"): all tokens split alternately in energy order, then ToMe's
  bipartite soft matching (the r A tokens with the best matches merge). Output: the unmerged A
  tokens (best match first, as the reference leaves them), then the B tokens.

The reference's timm/DeiT patch uses the ``bsm`` rule in the first ceil(depth / 2) blocks and the
``pitome`` rule in the others, with the margin 0.75 - 0.75 * layer / depth; its MAE patch swaps the
halves (``bsm_blocks="last_half"``). Merging is size-weighted (``merge_wavg``), sizes summed. The
reference runs without proportional attention (its block never passes sizes to the attention), so
``default_prop_attn`` is False. Since 2r tokens must take part in a ``pitome`` block, r is at most
n // 2 (``realise``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from .base import KEYS, MeanPosition, ReduceContext, Reduction, TokenOperator, identity_reduction
from .common import pool_by_assignment
from .tome import realise_bipartite


def energy_scores(keys: torch.Tensor, margin: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(energy B x N, cosine similarities B x N x N) of PiToMe, in float32.

    The mean runs over all N tokens, the token itself included, as in the reference.
    """
    k = F.normalize(keys.float(), p=2, dim=-1)
    sim = k @ k.transpose(1, 2)
    return F.elu(sim - margin, alpha=alpha).mean(dim=-1), sim


def _pair_scores(sim: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor) -> torch.Tensor:
    """sim[b, a_idx[b, i], b_idx[b, j]]: B x |A| x |B|."""
    rows = sim.gather(1, a_idx.unsqueeze(-1).expand(-1, -1, sim.shape[2]))
    return rows.gather(2, b_idx.unsqueeze(1).expand(-1, a_idx.shape[1], -1))


def _scatter_assignment(order: torch.Tensor, out_index: torch.Tensor, n: int) -> torch.Tensor:
    """B x N assignment from token indices ``order`` (B x M) and their output slots ``out_index`` (B x M)."""
    return torch.empty(order.shape[0], n, dtype=torch.long, device=order.device).scatter_(1, order, out_index)


def protected_assignment(sim: torch.Tensor, order: torch.Tensor, r: int) -> torch.Tensor:
    """PiToMe's rule: the 2r highest-energy tokens merge A -> B (A, B alternate in energy order)."""
    b, n = order.shape
    kept = n - 2 * r
    a_idx, b_idx = order[:, : 2 * r : 2], order[:, 1 : 2 * r : 2]
    dst = _pair_scores(sim, a_idx, b_idx).argmax(dim=-1)  # B x r: each A token's most similar B token
    slots = torch.arange(n, device=order.device).expand(b, n)
    out_index = torch.cat([slots[:, :r] + kept, dst + kept, slots[:, : kept]], dim=1)
    return _scatter_assignment(torch.cat([b_idx, a_idx, order[:, 2 * r :]], dim=1), out_index, n)


def bsm_assignment(sim: torch.Tensor, order: torch.Tensor, r: int) -> torch.Tensor:
    """PiToMe's ``bsm`` rule: A, B alternate in energy order, the r best-matched A tokens merge."""
    b, n = order.shape
    a_idx, b_idx = order[:, ::2], order[:, 1::2]
    n_a, n_b = a_idx.shape[1], b_idx.shape[1]
    best, partner = _pair_scores(sim, a_idx, b_idx).max(dim=-1)
    edge = best.argsort(dim=-1, descending=True, stable=True)  # A positions, best match first
    kept = n_a - r
    slots = torch.arange(max(n_a, n_b), device=order.device).expand(b, -1)
    src_out = partner.gather(1, edge[:, :r]) + kept
    out_index = torch.cat([slots[:, :n_b] + kept, src_out, slots[:, :kept]], dim=1)
    tokens = torch.cat([b_idx, a_idx.gather(1, edge[:, :r]), a_idx.gather(1, edge[:, r:])], dim=1)
    return _scatter_assignment(tokens, out_index, n)


@dataclass(frozen=True)
class PiToMe(MeanPosition, TokenOperator):
    """Energy-ordered merging that protects the isolated (informative) tokens; see the module docstring."""

    name = "pitome"
    summary = "PiToMe: merge among high-energy (redundant) key clusters, protect isolated tokens, size-weighted"
    merges = True
    default_prop_attn = False  # the reference's block does not pass sizes to its attention

    margin: float = 0.75  # the energy margin at block 0
    margin_schedule: Literal["linear", "constant"] = "linear"  # linear: margin * (1 - layer / depth), as the reference
    alpha: float = 1.0  # ELU's alpha for similarities below the margin
    bsm_blocks: Literal["first_half", "last_half", "none", "all"] = "first_half"  # where the bsm rule runs (timm/DeiT patch)

    def needs(self) -> frozenset[str]:
        return frozenset({KEYS})

    def realise(self, n: int, k: int, grid: Optional[tuple[int, int]]) -> int:
        return realise_bipartite(n, k)

    def block_margin(self, layer: int, depth: int) -> float:
        """The margin at block ``layer`` (a Python float: compiled graphs bake it in)."""
        if self.margin_schedule == "constant" or depth <= 0:
            return self.margin
        return self.margin - self.margin * (layer / depth)

    def uses_bsm(self, layer: int, depth: int) -> bool:
        """Whether block ``layer`` uses the bsm rule: the reference's first ceil(depth / 2) blocks by default."""
        first = -(-depth // 2)  # ceil(depth * 0.5)
        return {"first_half": layer < first, "last_half": layer >= first, "none": False, "all": True}[self.bsm_blocks]

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        n = x.shape[1]
        r = n - self.realise(n, k, None)
        if r == 0:  # static (shapes only): nothing to merge
            return identity_reduction(x, ctx)
        assert ctx.keys is not None, "pitome needs the block's keys"
        energy, sim = energy_scores(ctx.keys, self.block_margin(ctx.layer, ctx.depth), self.alpha)
        order = energy.argsort(dim=-1, descending=True, stable=True)
        rule = bsm_assignment if self.uses_bsm(ctx.layer, ctx.depth) else protected_assignment
        assignment = rule(sim, order, r)
        tokens, sizes = pool_by_assignment(x, ctx.sizes, assignment, n - r)
        return Reduction(tokens, sizes, assignment)
