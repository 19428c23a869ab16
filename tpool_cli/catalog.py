"""What ``tpool models`` lists: timm models, whether tpool patches them, and what they are made of.

Every model is built on the meta device (no memory, no weights, no download), so a listing costs
the module construction only; GMACs are counted on the meta model with torch's dispatcher-level
counter (:mod:`tpool_cli.flops_torch`), which needs shapes and nothing else.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import nn

from .errors import TpoolError
from .patch import check_supported

log = logging.getLogger(__name__)

# The default listing: one model per ViT family tpool knows of (supported or not), so that a bare
# `tpool models` is quick and shows every family with its reason.
FAMILY_EXAMPLES: tuple[str, ...] = (
    "vit_small_patch16_224",  # class-token ViT
    "deit_small_patch16_224",
    "deit_small_distilled_patch16_224",  # class + distillation token
    "deit3_small_patch16_224",  # LayerScale
    "vit_medium_patch16_gap_256",  # average pooling, no class token
    "vit_base_patch16_siglip_224",  # attention pooling (map)
    "vit_small_patch14_reg4_dinov2",  # register tokens
    "eva02_tiny_patch14_224",  # Eva: rope + SwiGLU
    "vit_base_patch16_rope_224",  # rope ViT (Eva class)
    "vit_small_patch16_dinov3",  # DINOv3 (Eva class)
    "swin_tiny_patch4_window7_224",  # windowed attention
    "hiera_tiny_224",  # windowed attention, hierarchical
    "naflexvit_base_patch16_gap",  # variable resolution
)


@dataclass
class ModelInfo:
    """One timm model as tpool sees it."""

    model: str
    family: str  # the timm class (VisionTransformer, Eva, SwinTransformer, ...)
    supported: bool
    reason: Optional[str]  # why tpool does not patch it (None when supported)
    prefix_tokens: Optional[int]  # class, distillation and register tokens
    pooling: Optional[str]  # token / avg / map / ... (timm's global_pool)
    pos_embed: str  # absolute / rope / both / none
    img_size: Optional[int]
    gmacs: Optional[float]  # per image at the default resolution (torch counter), None if not counted

    def row(self) -> dict[str, Any]:
        return asdict(self)


def match_models(pattern: Optional[str]) -> list[str]:
    """timm model names matching a shell-style ``pattern`` (default: :data:`FAMILY_EXAMPLES`)."""
    import timm

    if pattern is None:
        available = set(timm.list_models())
        return [name for name in FAMILY_EXAMPLES if name in available]
    names = timm.list_models(pattern) if any(ch in pattern for ch in "*?[") else [n for n in timm.list_models() if n == pattern]
    if not names:
        close = [n for n in timm.list_models() if fnmatch.fnmatch(n, f"*{pattern}*")][:5]
        hint = f"; models containing it: {', '.join(close)}" if close else ""
        raise TpoolError(f"no timm model matches {pattern!r}{hint}")
    return names


def _pos_embed_kind(model: nn.Module) -> str:
    absolute = getattr(model, "pos_embed", None) is not None
    rope = getattr(model, "rope", None) is not None or getattr(model, "rope_embed", None) is not None
    return {(True, True): "both", (True, False): "absolute", (False, True): "rope"}.get((absolute, rope), "none")


def _img_size(model: nn.Module) -> Optional[int]:
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size:
        return int(size[0])
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return int(cfg["input_size"][-1]) if "input_size" in cfg else None


def _gmacs(model: nn.Module, name: str) -> Optional[float]:
    from .flops import count_flops

    try:
        return count_flops(model, counter="torch").total
    except Exception as exc:  # noqa: BLE001 - a family the counter cannot run still gets its row
        log.info("GMACs of %s not counted: %s: %s", name, type(exc).__name__, exc)
        return None


def describe(name: str, gmacs: bool = True) -> ModelInfo:
    """Build ``name`` on the meta device and say whether and how tpool handles it."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False).eval()
    except Exception as exc:  # noqa: BLE001 - a model timm cannot build this way is reported, not fatal
        return ModelInfo(name, "?", False, f"cannot be built: {type(exc).__name__}: {str(exc)[:120]}", None, None, "?", None, None)
    try:
        check_supported(model)  # the one gate: refuses the families of patch.UNSUPPORTED_FAMILIES by name
        reason = None
    except TpoolError as exc:
        reason = str(exc)
    pool = getattr(model, "global_pool", None)
    return ModelInfo(
        model=name,
        family=type(model).__name__,
        supported=reason is None,
        reason=reason,
        prefix_tokens=getattr(model, "num_prefix_tokens", None),
        pooling=(pool or "none") if isinstance(pool, str) else (type(pool).__name__ if pool is not None else None),
        pos_embed=_pos_embed_kind(model),
        img_size=_img_size(model),
        gmacs=_gmacs(model, name) if gmacs else None,
    )


def describe_models(pattern: Optional[str], gmacs: bool = True) -> list[ModelInfo]:
    """:func:`describe` for every model matching ``pattern``."""
    return [describe(name, gmacs) for name in match_models(pattern)]
