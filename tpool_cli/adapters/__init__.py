"""Block adapters per model family, chosen by the block's exact class.

Adding a family: write a :class:`BlockAdapter` subclass supplying what differs (q/k/v, the
attention branch, the residuals) and add ``{BlockClass: Adapter()}`` to :data:`ADAPTERS`; the
reducing block, the state, the side tensors, FLOP attribution and source tracking are shared.
"""

from __future__ import annotations

from torch import nn

from ..errors import TpoolError
from .base import BlockAdapter
from .eva import ADAPTERS as _EVA
from .timm_vit import ADAPTERS as _TIMM

ADAPTERS: dict[type, BlockAdapter] = {**_TIMM, **_EVA}


def adapter_for(blk: nn.Module, index: int) -> BlockAdapter:
    """The adapter of this block's exact class, or one clear error naming the class."""
    adapter = ADAPTERS.get(type(blk))
    if adapter is None:
        known = ", ".join(sorted(cls.__name__ for cls in ADAPTERS))
        raise TpoolError(
            f"block {index} ({type(blk).__name__}) is not a block family tpool can patch (supported blocks: {known})"
        )
    reason = adapter.check(blk)
    if reason is not None:
        raise TpoolError(f"block {index} ({type(blk).__name__}): {reason}; this model is not supported")
    return adapter


__all__ = ["ADAPTERS", "BlockAdapter", "adapter_for"]
