"""MCTF (Lee et al., CVPR 2024, "Multi-criteria Token Fusion with One-step-ahead Attention").

ToMe-style bipartite fusion whose edge weights multiply three criteria, following the official
code (mlvlab/MCTF, ``utils/mctf.py``), with the whole sequence ``[prefix, patches]`` split
alternately (A = even, B = odd positions; prefix tokens never merge):

* similarity ``((cos(x_a, x_b) + 1) / 2) ** (1 / tau_sim)`` of the tokens themselves
  (``metric="tokens"``; ``"keys"`` uses the keys, mean over heads, as PiToMe's port does);
* informativeness ``(i_a * i_b) ** (1 / tau_info)`` with ``i = (1 / a) / max(1 / a)``, where ``a`` is
  the attention a token receives, mean over heads and queries (feature RECEIVED; the max runs over
  the whole sequence, prefix included) — tokens nobody attends to fuse first;
* size ``(s_a * s_b) ** (1 / tau_size)`` with ``s = (1 / size) / max(1 / size)`` (prefix tokens, of
  size 1, count in the max) — small tokens fuse first.

Bidirectional (the default): r // 2 A tokens fuse into B as in ToMe; then r - r // 2 B tokens fuse
into the remaining A tokens, scored by the same (pre-fusion) edge weights. Fusion is a weighted
mean with weights ``attention received x size`` (the reference's ``pooling_type=1``; ``"size"`` is
its type 0, ToMe's), sizes summed. Output order as the reference: the remaining A tokens (sorted
back by position when the model has prefix tokens), then the unfused B tokens (best remaining
match first). Defaults are the official DeiT-S setting (``tau`` 1/20/40, bidirectional, attention
pooling, proportional attention on). r is at most n // 2, the reference's cap (``realise``).

One-step-ahead attention (``one_step_ahead``, on by default: the official code's only setting,
``mctf_type[4] = 1``; ``Block_DEIT.forward`` in ``models/modules/blocks.py`` and ``merge_wavg`` at
mlvlab/MCTF 2004da0): the reducing block forms the attention of its unfused input tokens (q and k
only, proportional bias of the current sizes), fuses its *input* tokens with that attention as the
informativeness, and reuses the attention for the fused tokens: columns of a group summed, rows
averaged with the fusion weights (``Reduction.weights``), applied to the values of the fused
tokens. Asked for through ``reduces_before_attention()``; the block side is generic
(``ReducingBlock._forward_ahead`` in patch.py, ``ops.common.pool_attention``). With
``one_step_ahead=False`` tpool reduces between attention and MLP, as PiToMe's port of MCTF and
ToMe do (the official code without one-step-ahead fuses after the MLP of the same block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from .base import KEYS, RECEIVED, MeanPosition, ReduceContext, Reduction, TokenOperator, identity_reduction
from .common import pool_by_assignment
from .tofu import sequence_split
from .tome import realise_bipartite


def _criterion(values: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, tau: float) -> torch.Tensor:
    """(v_a * v_b) ** (1 / tau) for every A-B pair: B x |A| x |B|, as the outer product of v ** (1 / tau)
    (N powers instead of N^2 / 4; equal to the reference's form up to float rounding)."""
    powered = values ** (1.0 / tau)
    return powered[:, a_idx, None] * powered[:, None, b_idx]


def inverse_normalised(values: torch.Tensor, prefix: Optional[torch.Tensor]) -> torch.Tensor:
    """(1 / v) / max(1 / v) for the patch tokens, the max also running over ``prefix`` (B x P) when given."""
    inv = 1.0 / values
    full = inv if prefix is None else torch.cat([1.0 / prefix, inv], dim=1)
    return inv / full.amax(dim=1, keepdim=True)


def edge_weights(
    metric: torch.Tensor, received: Optional[torch.Tensor], sizes: torch.Tensor, num_prefix: int,
    taus: tuple[float, float, float],
) -> torch.Tensor:
    """MCTF's multi-criteria scores, B x |A| x |B| (float32). ``received``: B x (P + N) or None (skip info)."""
    b, n, _ = metric.shape
    a_idx, b_idx = sequence_split(n, num_prefix, metric.device)
    tau_sim, tau_info, tau_size = taus
    m = metric.float()
    m = m / torch.linalg.vecdot(m, m).sqrt().clamp_min(1e-12).unsqueeze(-1)
    start = num_prefix % 2  # strided views, not index copies of B x N x C (see sequence_split)
    if tau_sim:
        scores = ((m[:, start::2] @ m[:, 1 - start :: 2].transpose(1, 2) + 1) / 2) ** (1.0 / tau_sim)
    else:
        scores = torch.ones(b, a_idx.numel(), b_idx.numel(), device=metric.device)
    if tau_info > 0 and received is not None:
        info = inverse_normalised(received[:, num_prefix:], received[:, :num_prefix] if num_prefix else None)
        scores = scores * _criterion(info, a_idx, b_idx, tau_info)
    if tau_size:
        prefix = torch.ones(b, num_prefix, device=metric.device) if num_prefix else None
        scores = scores * _criterion(inverse_normalised(sizes.float(), prefix), a_idx, b_idx, tau_size)
    return scores


def fusion_assignment(
    scores: torch.Tensor, r: int, bidirectional: bool, sort_kept: bool, n: int, num_prefix: int
) -> torch.Tensor:
    """B x N output index of MCTF's (bidirectional) fusion from the edge weights (see module docstring)."""
    bsz, n_a, n_b = scores.shape
    device = scores.device
    r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
    best, partner = scores.max(dim=-1)
    edge = best.argsort(dim=-1, descending=True, stable=True)
    unm = edge[:, r1:]  # A positions kept, in output order
    if sort_kept:
        unm = unm.sort(dim=1).values
    n_unm = n_a - r1
    slots = torch.arange(max(n_a, n_b), device=device).expand(bsz, -1)
    a_out = torch.empty(bsz, n_a, dtype=torch.long, device=device).scatter_(1, unm, slots[:, :n_unm])
    if bidirectional:  # B -> remaining A, scored by the same weights (A rows of the kept tokens)
        back = scores.gather(1, unm.unsqueeze(-1).expand(-1, -1, n_b)).transpose(1, 2)  # B x |B| x n_unm
        best2, partner2 = back.max(dim=-1)
        edge2 = best2.argsort(dim=-1, descending=True, stable=True)
        b_slot = torch.cat([partner2.gather(1, edge2[:, :r2]), n_unm + slots[:, : n_b - r2]], dim=1)
        b_out = torch.empty(bsz, n_b, dtype=torch.long, device=device).scatter_(1, edge2, b_slot)
    else:
        b_out = n_unm + slots[:, :n_b]
    src = edge[:, :r1]
    a_out = a_out.scatter(1, src, b_out.gather(1, partner.gather(1, src)))  # fused A follow their B token
    assignment = torch.empty(bsz, n, dtype=torch.long, device=device)
    start = num_prefix % 2
    assignment[:, start::2] = a_out
    assignment[:, 1 - start :: 2] = b_out
    return assignment


@dataclass(frozen=True)
class MCTF(MeanPosition, TokenOperator):
    """Multi-criteria (similarity, informativeness, size) bidirectional token fusion; see the module docstring."""

    name = "mctf"
    summary = "MCTF: bidirectional fusion scored by similarity x informativeness x size, attention-weighted"
    merges = True
    default_prop_attn = True  # the official setting (mctf_type[3] = 1)

    tau_sim: float = 1.0  # 0 switches the criterion off
    tau_info: float = 20.0
    tau_size: float = 40.0
    bidirectional: bool = True
    pooling: Literal["attention", "size"] = "attention"  # attention: weights attention x size (pooling_type 1)
    metric: Literal["tokens", "keys"] = "tokens"  # tokens: the official code; keys: PiToMe's port
    # fuse the block's input before its attention and reuse that attention, pooled (the official mctf_type[4] = 1)
    one_step_ahead: bool = True

    def reduces_before_attention(self) -> bool:
        return self.one_step_ahead

    def needs(self) -> frozenset[str]:
        wanted = {RECEIVED} if self.tau_info > 0 or self.pooling == "attention" else set()
        return frozenset(wanted | ({KEYS} if self.metric == "keys" else set()))

    def realise(self, n: int, k: int, grid: Optional[tuple[int, int]]) -> int:
        return realise_bipartite(n, k)

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        n = x.shape[1]
        r = n - self.realise(n, k, None)
        if r == 0:  # static (shapes only): nothing to fuse
            return identity_reduction(x, ctx)
        metric = ctx.keys if self.metric == "keys" else x
        assert metric is not None, "mctf(metric=keys) needs the block's keys"
        received = ctx.received
        assert received is not None or RECEIVED not in self.needs(), "mctf needs the attention received per token"
        p = ctx.num_prefix
        scores = edge_weights(metric, received, ctx.sizes, p, (self.tau_sim, self.tau_info, self.tau_size))
        assignment = fusion_assignment(scores, r, self.bidirectional, p > 0, n, p)
        weights = None
        if self.pooling == "attention":
            weights = received[:, p:].float() * ctx.sizes.float()
        tokens, sizes = pool_by_assignment(x, ctx.sizes, assignment, n - r, weights)
        return Reduction(tokens, sizes, assignment, weights=weights)
