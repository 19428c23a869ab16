"""timm's ``VisionTransformer`` ``Block`` (ViT, DeiT, DeiT-III, registers, q/k-norm, gated attention)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from ..attention import attend, spec_of
from .base import BlockAdapter


def timm_qkv(attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of ``timm.layers.Attention`` (fused qkv with its bias, then q/k-norm), B x H x N x D."""
    b, n, _ = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def timm_projection(attn: nn.Module, h: torch.Tensor, parts: slice) -> torch.Tensor:
    """Some of q, k, v (``parts`` of the 3 thirds of ``qkv``) of ``timm.layers.Attention``: P x B x H x N x D.

    One linear on the matching rows of the fused weight and bias: only that work is done."""
    b, n, _ = h.shape
    width = attn.num_heads * attn.head_dim
    rows = slice(parts.start * width, parts.stop * width)
    bias = attn.qkv.bias[rows] if attn.qkv.bias is not None else None
    out = F.linear(h, attn.qkv.weight[rows], bias)
    return out.reshape(b, n, parts.stop - parts.start, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)


def timm_attention_output(attn: nn.Module, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Heads merged, scale-norm, gate (computed from the normed input h), proj, as timm's Attention does."""
    b, n, _ = h.shape
    out = out.transpose(1, 2).reshape(b, n, attn.attn_dim if hasattr(attn, "attn_dim") else -1)
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(h).sigmoid()
    return attn.proj_drop(attn.proj(out))


def attention_with_features(
    attn: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor], needs: frozenset[str], num_prefix: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``attn`` (a timm ``Attention``) on the normed tokens x: (output B x N x C, requested features)."""
    q, k, v = timm_qkv(attn, x)
    out, features = attend(q, k, v, spec_of(attn), bias, needs, num_prefix)
    return timm_attention_output(attn, out, x), features


class TimmAdapter(BlockAdapter):
    """timm ``Block``: norm1 -> Attention -> ls1 -> drop_path1, norm2 -> Mlp -> ls2 -> drop_path2."""

    family = "timm VisionTransformer"

    def run_original(self, blk: nn.Module, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        kwargs.pop("rope", None)
        return blk(x, **kwargs)

    def qkv(self, blk: nn.Module, h: torch.Tensor, rope: Optional[torch.Tensor], num_prefix: int):
        return timm_qkv(blk.attn, h)

    def qk(self, blk: nn.Module, h: torch.Tensor, rope: Optional[torch.Tensor], num_prefix: int):
        q, k = timm_projection(blk.attn, h, slice(0, 2)).unbind(0)
        return blk.attn.q_norm(q), blk.attn.k_norm(k)

    def values(self, blk: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return timm_projection(blk.attn, h, slice(2, 3))[0]

    def attention_output(self, blk: nn.Module, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return timm_attention_output(blk.attn, out, h)

    def check(self, blk: nn.Module) -> Optional[str]:
        attn = blk.attn
        missing = [a for a in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm", "proj") if not hasattr(attn, a)]
        return f"its attention is not timm's Attention (missing {', '.join(missing)})" if missing else None


ADAPTERS = {Block: TimmAdapter()}
