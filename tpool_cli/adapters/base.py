"""What a model family's block must supply so the one reducing block can run it.

``ReducingBlock.forward`` (patch.py) is generic: norm, q/k/v, the shared :func:`attend`, the
attention residual, the operator, the MLP residual. A :class:`BlockAdapter` supplies only what
differs between families: how its attention turns normed tokens into per-head q, k, v (its
biases, q/k-norm, rope), how the heads' output becomes the attention branch (scale-norm, gate,
proj), its two residuals (LayerScale, drop-path) and how to call the original block untouched.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn

from ..attention import AttentionSpec, spec_of


class BlockAdapter:
    """Base adapter: the parts every pre-norm timm block shares; families override what differs."""

    family: ClassVar[str] = "?"
    # True when the family's attention applies rotary position embeddings to the patch tokens
    uses_rope: ClassVar[bool] = False

    def run_original(self, blk: nn.Module, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """The family's own block, untouched (bit-identical until the first reduction)."""
        return blk(x, **kwargs)

    def norm1(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return blk.norm1(x)

    def qkv(
        self, blk: nn.Module, h: torch.Tensor, rope: Optional[torch.Tensor], num_prefix: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q, k, v (B x H x N x D) of the normed tokens h, as the family's attention forms them."""
        raise NotImplementedError

    def qk(
        self, blk: nn.Module, h: torch.Tensor, rope: Optional[torch.Tensor], num_prefix: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k only (a reduce-before-attention block forms them on the unreduced tokens).
        Default: from :meth:`qkv` (its v wasted); families override it to project q and k alone."""
        q, k, _ = self.qkv(blk, h, rope, num_prefix)
        return q, k

    def values(self, blk: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """v only (B x H x N x D; rope never touches v), for the reduced tokens of a reduce-before-attention
        block. Default: from :meth:`qkv` (its q and k wasted); families override it."""
        return self.qkv(blk, h, None, 0)[2]

    def spec(self, blk: nn.Module) -> AttentionSpec:
        return spec_of(blk.attn)

    def attention_output(self, blk: nn.Module, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Attention branch (B x N x C) from the heads' output (B x H x N x D) and the normed input h."""
        raise NotImplementedError

    def attn_residual(self, blk: nn.Module, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return x + blk.drop_path1(blk.ls1(branch))

    def mlp_residual(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def check(self, blk: nn.Module) -> Optional[str]:
        """Why this block cannot be patched (None when it can): settings of the family tpool does not run."""
        return None
