"""The quantity Token Pooling minimises: how well the reduced tokens reconstruct the full set.

For input patch tokens x_i (each standing for s_i original patches) and output tokens y_k, the
(asymmetric Chamfer) reconstruction error is

    E = sum_i w_i * min_k ||x_i - y_k||^2 / sum_i w_i,     w_i = s_i           (unweighted)
                                                            w_i = s_i * sig_i   (weighted)

with sig_i the significance score (attention token i receives, summed over heads and queries).
Normalising by sum_i w_i makes E a mean squared error per original patch, comparable across
layers and operators at the same K. Pruned tokens are reconstructed by their nearest kept token.
"""

from __future__ import annotations

from typing import Optional

import torch

from .ops.common import squared_distances


def reconstruction_error(
    x: torch.Tensor, y: torch.Tensor, sizes: torch.Tensor, significance: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per-image error (B,) of reconstructing x (B x N x C) from y (B x K x C); see module doc."""
    w = sizes.float() if significance is None else sizes.float() * significance.float()
    nearest = squared_distances(x, y).min(dim=-1).values
    return (w * nearest).sum(dim=1) / w.sum(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
