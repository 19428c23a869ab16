"""The one attend-with-features function every block family shares.

A family's adapter (``tpool_cli/adapters``) turns its block's input into per-head q, k, v (with
its own biases, q/k-norm and rope) and an :class:`AttentionSpec`; :func:`attend` runs the
attention exactly as timm does (fused ``scaled_dot_product_attention``, or the explicit softmax
when the module has fused attention off) and computes, only when asked, the features operators
read (registered by name in ``ops/base.py``: class-token attention, significance, keys...).
A feature that needs the explicit N x N attention (significance) switches the block to the
explicit path; the others keep the fused kernel (class attention costs one 1 x N row per head).

``bias`` is an additive attention bias (log token sizes for proportional attention), B x 1 x 1 x N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .ops.base import FEATURE_REGISTRY, AttentionView


@dataclass(frozen=True)
class AttentionSpec:
    """How a family's attention module attends (read from the module, not from the family)."""

    scale: float
    fused: bool
    attn_drop: nn.Module
    training: bool


def spec_of(attn: nn.Module) -> AttentionSpec:
    """The spec of a timm-style attention module (``scale``, ``fused_attn``, ``attn_drop``)."""
    return AttentionSpec(float(attn.scale), bool(getattr(attn, "fused_attn", False)), attn.attn_drop, attn.training)


def attention_weights(q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The explicit softmax attention B x H x N x N, as timm's non-fused path forms it (bias added to the logits)."""
    scores = (q * spec.scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias.to(q.dtype)
    return scores.softmax(dim=-1)


def apply_weights(weights: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """Heads' output (B x H x N x D) of given attention weights on the values, attention dropout included."""
    return spec.attn_drop(weights) @ v


def features_of(view: AttentionView, needs: frozenset[str]) -> dict[str, torch.Tensor]:
    """The requested features of one block's attention, by name."""
    return {name: FEATURE_REGISTRY[name].compute(view) for name in sorted(needs)}


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionSpec,
    bias: Optional[torch.Tensor],
    needs: frozenset[str],
    num_prefix: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Attention output (B x H x N x D, heads not yet merged) and the requested features."""
    if bias is not None:
        bias = bias.to(q.dtype)
    explicit = not spec.fused or any(FEATURE_REGISTRY[name].needs_weights for name in needs)
    weights = None
    if explicit:
        weights = attention_weights(q, k, spec, bias)
        out = apply_weights(weights, v, spec)
    else:
        p = spec.attn_drop.p if spec.training and isinstance(spec.attn_drop, nn.Dropout) else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
    view = AttentionView(q=q, k=k, v=v, scale=spec.scale, bias=bias, num_prefix=num_prefix, weights=weights)
    return out, features_of(view, needs)


def attend_ahead(
    q: torch.Tensor, k: torch.Tensor, spec: AttentionSpec, bias: Optional[torch.Tensor], needs: frozenset[str], num_prefix: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The attention weights (B x H x N x N) and requested features of a reduce-before-attention block.

    No output yet: the block reduces its tokens first and applies these weights, pooled by the
    reduction, to the reduced tokens' values (MCTF's one-step-ahead attention), so the values of
    the unreduced tokens are never formed.
    """
    if bias is not None:
        bias = bias.to(q.dtype)
    weights = attention_weights(q, k, spec, bias)
    view = AttentionView(q=q, k=k, v=None, scale=spec.scale, bias=bias, num_prefix=num_prefix, weights=weights)
    return weights, features_of(view, needs)
