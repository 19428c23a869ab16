"""FLOP counting with fvcore, made honest for ViTs with token reduction.

Convention (fvcore's, and the literature's "GFLOPs" for DeiT): one multiply-add = one flop, so
every number here is in MACs and labelled GMACs. fvcore misses two things we add handles for:

* ``aten::scaled_dot_product_attention`` (timm's fused attention), which it would count as zero:
  QK^T + AV = B*H*Nq*Nk*(Dqk + Dv) MACs;
* the scatter-adds operators use to pool tokens (one add per source element), ``cdist``, and
  ``linalg_vecdot`` (row-wise dot products: squared norms, K-Medoids costs) and ``baddbmm`` (the
  fused distance matmul of the clustering assignment step).

Elementwise ops (residual adds, GELU, softmax...) stay uncounted, as in fvcore and the papers;
every op that was not counted is listed by name in the report so nothing is missed silently.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

from .patch import ReducingBlock, is_patched


def _sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    q, k, v = (get_shape(i) for i in inputs[:3])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _source_numel_macs(inputs: list[Any], outputs: list[Any]) -> int:
    # scatter_add(self, dim, index, src) / index_add(self, dim, index, source): one add per source element
    return math.prod(get_shape(inputs[3]))


def _cdist_macs(inputs: list[Any], outputs: list[Any]) -> int:
    x1, x2 = get_shape(inputs[0]), get_shape(inputs[1])
    return math.prod(x1) * x2[-2]


def _baddbmm_macs(inputs: list[Any], outputs: list[Any]) -> int:
    # baddbmm(input, batch1, batch2): the batched matmul (the scaled add of input is elementwise)
    return math.prod(get_shape(inputs[1])) * get_shape(inputs[2])[-1]


def _vecdot_macs(inputs: list[Any], outputs: list[Any]) -> int:
    # linalg_vecdot(x, y): one multiply-add per element of the broadcast inputs
    return math.prod(torch.broadcast_shapes(tuple(get_shape(inputs[0])), tuple(get_shape(inputs[1]))))


EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": _sdpa_macs,
    "aten::scatter_add": _source_numel_macs,
    "aten::scatter_add_": _source_numel_macs,
    "aten::index_add": _source_numel_macs,
    "aten::index_add_": _source_numel_macs,
    "aten::_cdist_forward": _cdist_macs,
    "aten::cdist": _cdist_macs,
    "aten::linalg_vecdot": _vecdot_macs,
    "aten::baddbmm": _baddbmm_macs,
}


@dataclass
class LayerFlops:
    """One transformer block: tokens and MACs (in GMACs) split the way the paper argues about them."""

    layer: int
    tokens_in: int  # patch tokens entering the block (prefix tokens not included)
    tokens_out: int
    attention: float  # qkv + QK^T + AV + proj (and the class-row / explicit attention where computed)
    mlp: float
    operator: float  # the token-reduction operator's own cost
    total: float  # the whole block (includes its norms)


@dataclass
class FlopReport:
    """Per-image GMACs of a model (patched or not) at one input size."""

    total: float
    layers: list[LayerFlops]
    stem: float  # patch embedding
    head: float  # final norm + classifier head(s)
    num_prefix: int
    params: int
    uncounted: dict[str, int] = field(default_factory=dict)  # op name -> occurrences not counted


def _input_size(model: nn.Module, img_size: int | None) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    if img_size is not None:
        h = w = img_size
    elif hasattr(model, "patch_embed") and getattr(model.patch_embed, "img_size", None):
        h, w = model.patch_embed.img_size
    return c, h, w


@torch.no_grad()
def count_flops(model: nn.Module, img_size: int | None = None) -> FlopReport:
    """Trace one image through ``model`` with fvcore and return per-block GMACs.

    Runs on the model's device and dtype; the count does not depend on the weights.
    """
    param = next(model.parameters())
    x = torch.zeros(1, *_input_size(model, img_size), device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    analysis = FlopCountAnalysis(model, x)
    for name, handle in EXTRA_HANDLES.items():
        analysis.set_op_handle(name, handle)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit tracer warnings about python ints from shapes
        by_module = analysis.by_module()
        uncounted = dict(analysis.unsupported_ops())
    model.train(was_training)

    g = 1e-9
    patched = is_patched(model)
    counts = dict(model.tpool_state.counts) if patched else {}
    num_prefix = int(getattr(model, "num_prefix_tokens", 1))
    n0 = (model.tpool_state.n0 if patched else None) or model.patch_embed.num_patches
    layers = []
    for i, blk in enumerate(model.blocks):
        inner = f"blocks.{i}.block" if isinstance(blk, ReducingBlock) else f"blocks.{i}"
        n_in, n_out = counts.get(i, (n0, n0))
        layers.append(
            LayerFlops(
                layer=i,
                tokens_in=n_in,
                tokens_out=n_out,
                attention=by_module.get(f"{inner}.attn", 0) * g,
                mlp=by_module.get(f"{inner}.mlp", 0) * g,
                operator=by_module.get(f"blocks.{i}.reducer", 0) * g,
                total=by_module.get(f"blocks.{i}", 0) * g,
            )
        )
    total = by_module[""] * g
    stem = by_module.get("patch_embed", 0) * g
    return FlopReport(
        total=total,
        layers=layers,
        stem=stem,
        head=total - stem - sum(layer.total for layer in layers),
        num_prefix=num_prefix,
        params=sum(p.numel() for p in model.parameters()),
        uncounted=uncounted,
    )
