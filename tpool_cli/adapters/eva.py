"""timm's ``Eva`` class (EVA-02, the rope ViTs ``vit_*_rope_*``, DINOv3): ``EvaBlock``.

What differs from a timm ``Block``: the attention (``EvaAttention`` with its q/v bias outside the
fused ``qkv``, or separate q/k/v projections; or ``AttentionRope``) applies rotary position
embeddings to the patch tokens inside the attention; LayerScale is ``gamma_1``/``gamma_2`` (None
when off); the MLP may be a SwiGLU (``GluMlp``/``SwiGLU``), which is just ``blk.mlp`` here.

Rope after a reduction: the ``Eva`` model passes every block the rope of the full patch grid
(one tensor, or one per block for mixed rope). Each token carries its position
(``ReductionState.positions``, replayed through every reduction, see patch.py): a kept token or a
representative its original patch's, whose rope rows the reducing block gathers (as timm's own
patch dropout does with ``apply_keep_indices_nlc``); a merged token the size-weighted mean of its
members', at which the rope is evaluated (``adapters/rope.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers.attention import AttentionRope
from timm.layers.pos_embed_sincos import apply_rot_embed_cat
from timm.models.eva import EvaAttention, EvaBlock
from torch import nn

from .base import BlockAdapter


def eva_qkv(attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B x H x N x D) before rope, as ``EvaAttention``/``AttentionRope`` form them (biases included)."""
    b, n, _ = h.shape
    if attn.qkv is not None:
        bias = getattr(attn, "q_bias", None)
        if bias is None:
            qkv = attn.qkv(h)
        else:
            qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            if attn.qkv_bias_separate:
                qkv = attn.qkv(h)
                qkv += qkv_bias
            else:
                qkv = F.linear(h, weight=attn.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = attn.q_proj(h).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(h).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
        v = attn.v_proj(h).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
    return attn.q_norm(q), attn.k_norm(k), v


def eva_projection(attn: nn.Module, h: torch.Tensor, parts: slice) -> torch.Tensor:
    """Some of q, k, v (``parts`` of the three) before q/k-norm and rope, as :func:`eva_qkv` forms them,
    projecting only those: P x B x H x N x D (a reduce-before-attention block's q, k, then v)."""
    b, n, _ = h.shape
    if attn.qkv is None:
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)[parts]
        return torch.stack([proj(h).reshape(b, n, attn.num_heads, -1).transpose(1, 2) for proj in projs])
    width = attn.qkv.weight.shape[0] // 3
    rows = slice(parts.start * width, parts.stop * width)
    q_bias = getattr(attn, "q_bias", None)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if q_bias is not None else attn.qkv.bias
    out = F.linear(h, attn.qkv.weight[rows], None if bias is None else bias[rows])
    return out.reshape(b, n, parts.stop - parts.start, attn.num_heads, -1).permute(2, 0, 3, 1, 4)


def apply_rope(attn: nn.Module, t: torch.Tensor, rope: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Rotate the patch tokens of q or k (prefix tokens untouched), exactly as the attention does."""
    npt = attn.num_prefix_tokens
    half = getattr(attn, "rotate_half", False)
    return torch.cat([t[:, :, :npt, :], apply_rot_embed_cat(t[:, :, npt:, :], rope, half=half)], dim=2).type_as(like)


class EvaAdapter(BlockAdapter):
    """``EvaBlock``: norm1 -> attention(rope) -> gamma_1 -> drop_path1, norm2 -> mlp -> gamma_2 -> drop_path2."""

    family = "timm Eva (EVA-02, rope ViT, DINOv3)"
    uses_rope = True

    def qkv(self, blk: nn.Module, h: torch.Tensor, rope: Optional[torch.Tensor], num_prefix: int):
        q, k, v = eva_qkv(blk.attn, h)
        if rope is not None:
            q, k = apply_rope(blk.attn, q, rope, v), apply_rope(blk.attn, k, rope, v)
        return q, k, v

    def qk(self, blk: nn.Module, h: torch.Tensor, rope: Optional[torch.Tensor], num_prefix: int):
        q, k = eva_projection(blk.attn, h, slice(0, 2)).unbind(0)
        q, k = blk.attn.q_norm(q), blk.attn.k_norm(k)
        if rope is not None:
            q, k = apply_rope(blk.attn, q, rope, q), apply_rope(blk.attn, k, rope, k)
        return q, k

    def values(self, blk: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return eva_projection(blk.attn, h, slice(2, 3))[0]

    def attention_output(self, blk: nn.Module, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        attn = blk.attn
        b, n, c = h.shape
        out = out.transpose(1, 2).reshape(b, n, getattr(attn, "attn_dim", c))
        out = attn.norm(out)
        if attn.gate is not None:
            out = out * attn.gate(h).sigmoid()
        return attn.proj_drop(attn.proj(out))

    def attn_residual(self, blk: nn.Module, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        if blk.gamma_1 is not None:
            branch = blk.gamma_1 * branch
        return x + blk.drop_path1(branch)

    def mlp_residual(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        branch = blk.mlp(blk.norm2(x))
        if blk.gamma_2 is not None:
            branch = blk.gamma_2 * branch
        return x + blk.drop_path2(branch)

    def check(self, blk: nn.Module) -> Optional[str]:
        attn = blk.attn
        if type(attn) not in (EvaAttention, AttentionRope):
            return f"its attention ({type(attn).__name__}) is not EvaAttention or AttentionRope"
        if getattr(attn, "num_kv_groups", 1) > 1:
            return "grouped-query attention (num_kv_heads < num_heads) is not supported"
        return None


ADAPTERS = {EvaBlock: EvaAdapter()}
