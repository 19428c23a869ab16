"""The free reduction: a speed reference for `tpool bench`, not a token-reduction method.

``drop`` keeps the first K patch tokens and throws the rest away. It reads no block feature, so
every block keeps fused attention, and its own cost is one slice. A model patched with ``drop`` at
an operator's realised token counts runs the same token schedule as that operator with a reduction
that costs (almost) nothing: the throughput an operator would reach if its reduction were free.
Going through the same patch mechanism as the real operators, it pays the same bookkeeping (the
split-off prefix tokens, the concatenation), so operator/ideal isolates what the operator itself
and the features it asks for cost.

Its accuracy is meaningless (which patches survive depends only on their position), so it is not
part of `--ops all` or any sweep default (`--op drop` runs it on purpose); the registry lists it so
that the one mechanism runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ReduceContext, Reduction, TokenOperator


@dataclass(frozen=True)
class DropTokens(TokenOperator):
    name = "drop"
    summary = "speed reference, not a method: keep the first K patch tokens (free reduction; bench's 'ideal')"

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        position = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        assignment = torch.where(position < k, position, torch.full_like(position, -1))
        return Reduction(x[:, :k], ctx.sizes[:, :k], assignment, representative=position[:, :k])
