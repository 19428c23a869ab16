"""timm's self-attention, recomputed so that it can also hand out what operators need.

Mirrors ``timm.layers.Attention.forward`` step for step (qkv, q/k-norm, fused or explicit
attention, scale-norm, gate, proj) and adds, only when asked:

* ``cls_attn``: the class-token row of the attention (one 1 x N matmul per head), so that blocks
  of class-attention operators keep fused attention for the full output;
* ``significance``: attention received per token, summed over heads and all queries, which needs
  the explicit N x N attention (only in the blocks that reduce);
* ``keys``: keys averaged over heads;
* ``received``: attention received by every token (prefix included), mean over heads and queries
  (MCTF's informativeness criterion), also from the explicit attention.

``bias`` is an additive attention bias (log token sizes for proportional attention), B x 1 x 1 x N.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .ops.base import CLS_ATTN, KEYS, RECEIVED, SIGNIFICANCE


def attention_with_features(
    attn: nn.Module,
    x: torch.Tensor,
    bias: Optional[torch.Tensor],
    needs: frozenset[str],
    num_prefix: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``attn`` (a timm Attention) on x, returning its output and the requested features."""
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if bias is not None:
        bias = bias.to(q.dtype)
    features: dict[str, torch.Tensor] = {}

    explicit = SIGNIFICANCE in needs or RECEIVED in needs  # features that need the full N x N attention
    if explicit or not attn.fused_attn:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        weights = scores.softmax(dim=-1)
        if SIGNIFICANCE in needs:
            features[SIGNIFICANCE] = weights[..., num_prefix:].float().sum(dim=(1, 2))
        if CLS_ATTN in needs:
            features[CLS_ATTN] = weights[:, :, 0, num_prefix:].float().mean(dim=1)
        if RECEIVED in needs:  # MCTF's informativeness: every token, prefix included, mean over heads and queries
            features[RECEIVED] = weights.float().mean(dim=(1, 2))
        out = attn.attn_drop(weights) @ v
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
        if CLS_ATTN in needs:
            cls_scores = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
            if bias is not None:
                cls_scores = cls_scores + bias
            features[CLS_ATTN] = cls_scores.float().softmax(dim=-1)[:, :, 0, num_prefix:].mean(dim=1)
    if KEYS in needs:
        features[KEYS] = k[:, :, num_prefix:].mean(dim=1)

    out = out.transpose(1, 2).reshape(b, n, attn.attn_dim if hasattr(attn, "attn_dim") else -1)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, features
