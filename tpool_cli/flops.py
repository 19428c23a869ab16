"""FLOP counting for ViTs with token reduction: per-block columns that add up, from two counters.

Convention (fvcore's, and the literature's "GFLOPs" for DeiT): one multiply-add = one MAC, and
every number here is in MACs, labelled GMACs. Two counters give the same table:

* ``fvcore`` (the default): traces the model with ``torch.jit`` and counts per traced op. fvcore
  misses some ops we add handles for: ``aten::scaled_dot_product_attention`` (timm's fused
  attention, QK^T + AV = B*H*Nq*Nk*(Dqk + Dv) MACs), the scatter/index-adds that pool tokens (one
  add per source element), ``cdist``, ``linalg_vecdot`` (row-wise dot products), ``linalg_vector_norm`` and ``baddbmm``
  (the fused distance matmul of the clustering assignment step).
* ``torch``: ``torch.utils.flop_counter.FlopCounterMode`` at the dispatcher, completed by
  :mod:`tpool_cli.flops_torch` with formulas for what it misses.

Both hand over the same thing, MACs per module scope and op (see :func:`split_blocks`), so the
per-block split into attention / MLP / operator / other is one piece of code. Elementwise ops
(residual adds, GELU, softmax...) stay uncounted, as in fvcore and the papers; every op that was
not counted is listed by name in the report, so nothing is missed silently.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

import torch
from torch import nn

from .errors import TpoolError
from .patch import ReducingBlock, is_patched

CounterName = Literal["fvcore", "torch"]
COUNTERS: tuple[str, ...] = ("fvcore", "torch")
AGREEMENT_TOLERANCE = 1e-3  # both counters must agree to 0.1% on every column of every block
Scopes = Mapping[str, Mapping[str, int]]  # module name ("" = model) -> op -> MACs, submodules included


def _get_shape(value: Any) -> list[int]:
    from fvcore.nn.jit_handles import get_shape

    return get_shape(value)


def _sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    q, k, v = (_get_shape(i) for i in inputs[:3])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _source_numel_macs(inputs: list[Any], outputs: list[Any]) -> int:
    # scatter_add(self, dim, index, src) / index_add(self, dim, index, source): one add per source element
    return math.prod(_get_shape(inputs[3]))


def _cdist_macs(inputs: list[Any], outputs: list[Any]) -> int:
    x1, x2 = _get_shape(inputs[0]), _get_shape(inputs[1])
    return math.prod(x1) * x2[-2]


def _baddbmm_macs(inputs: list[Any], outputs: list[Any]) -> int:
    # baddbmm(input, batch1, batch2): the batched matmul (the scaled add of input is elementwise)
    return math.prod(_get_shape(inputs[1])) * _get_shape(inputs[2])[-1]


def _vecdot_macs(inputs: list[Any], outputs: list[Any]) -> int:
    # linalg_vecdot(x, y): one multiply-add per element of the broadcast inputs
    return math.prod(torch.broadcast_shapes(tuple(_get_shape(inputs[0])), tuple(_get_shape(inputs[1]))))


def _vector_norm_macs(inputs: list[Any], outputs: list[Any]) -> int:
    # linalg_vector_norm(x, ord, dim): one per input element, the 2-norm's square-and-add, so that a
    # norm taken with F.normalize costs what the same norm taken with vecdot(x, x) costs
    return math.prod(_get_shape(inputs[0]))


EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": _sdpa_macs,
    "aten::scatter_add": _source_numel_macs,
    "aten::scatter_add_": _source_numel_macs,
    "aten::index_add": _source_numel_macs,
    "aten::index_add_": _source_numel_macs,
    "aten::_cdist_forward": _cdist_macs,
    "aten::cdist": _cdist_macs,
    "aten::linalg_vecdot": _vecdot_macs,
    "aten::linalg_vector_norm": _vector_norm_macs,
    "aten::baddbmm": _baddbmm_macs,
}


@dataclass
class LayerFlops:
    """One transformer block: tokens and GMACs, split so that the four columns sum to ``total``.

    ``attention``: what the unreduced block's attention computes (qkv, q/k-norm, QK^T, AV, proj);
    ``mlp``: the MLP; ``operator``: the reducer and the features computed only for it (the
    class-token attention row under fused attention); ``other``: the rest of the block (its
    norms, LayerScale). ``attention + mlp + operator + other == total``, exactly in MACs.
    """

    layer: int
    tokens_in: int  # patch tokens entering the block (prefix tokens not included)
    tokens_out: int
    attention: float
    mlp: float
    operator: float
    other: float
    total: float


@dataclass
class FlopReport:
    """Per-image GMACs of a model (patched or not) at one input size, from one counter."""

    total: float
    layers: list[LayerFlops]
    stem: float  # patch embedding (+ position embedding, prefix tokens)
    head: float  # final norm + pooling + classifier head(s)
    num_prefix: int
    params: int
    uncounted: dict[str, int] = field(default_factory=dict)  # op name -> occurrences not counted
    counter: str = "fvcore"


def _input_size(model: nn.Module, img_size: int | None) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    if img_size is not None:
        h = w = img_size
    elif hasattr(model, "patch_embed") and getattr(model.patch_embed, "img_size", None):
        h, w = model.patch_embed.img_size
    return c, h, w


def fvcore_scopes(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, Counter], dict[str, int]]:
    """MACs per module scope and op as fvcore counts them (with our handles), and the uncounted ops."""
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, x)
    for name, handle in EXTRA_HANDLES.items():
        analysis.set_op_handle(name, handle)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit tracer warnings about python ints from shapes
        scopes = {name: Counter(ops) for name, ops in analysis.by_module_and_operator().items()}
        uncounted = dict(analysis.unsupported_ops())
    return scopes, uncounted


def is_fused_attention(op: str) -> bool:
    """Whether an op name (either counter's spelling) is a fused attention kernel (QK^T and AV in one)."""
    return "scaled_dot_product" in op or "flash_attention" in op or "efficient_attention" in op


def _macs(scopes: Scopes, name: str) -> int:
    return int(sum(scopes.get(name, {}).values()))


def split_block(scopes: Scopes, index: int, wrapped: bool) -> tuple[int, int, int, int, int]:
    """(attention, mlp, operator, other, total) MACs of block ``index``; the first four sum to total.

    A wrapped block (:class:`~tpool_cli.patch.ReducingBlock`) that reduces, or runs after a
    reduction, computes its attention itself: qkv and proj inside ``block.attn``, but QK^T and AV
    (and, under fused attention, the class-token row an operator reads) in its own scope. Those
    ops, the block's "own" ops, go to attention, except matmuls next to a fused attention kernel:
    they can only be the operator's feature rows (the attention itself is the kernel).
    """
    outer = f"blocks.{index}"
    inner = f"{outer}.block" if wrapped else outer
    total = _macs(scopes, outer)
    attention, mlp = _macs(scopes, f"{inner}.attn"), _macs(scopes, f"{inner}.mlp")
    operator = _macs(scopes, f"{outer}.reducer") if wrapped else 0
    if wrapped:
        own = Counter(scopes.get(outer, {}))
        own.subtract(scopes.get(inner, {}))
        own.subtract(scopes.get(f"{outer}.reducer", {}))
        fused = any(is_fused_attention(op) and macs for op, macs in own.items())
        for op, macs in own.items():
            if fused and not is_fused_attention(op):
                operator += macs
            else:
                attention += macs
    return attention, mlp, operator, total - attention - mlp - operator, total


def report_from_scopes(model: nn.Module, scopes: Scopes, uncounted: dict[str, int], counter: str) -> FlopReport:
    """Assemble the per-block report of ``model`` from either counter's scopes."""
    g = 1e-9
    patched = is_patched(model)
    counts = dict(model.tpool_state.counts) if patched else {}
    n0 = (model.tpool_state.n0 if patched else None) or model.patch_embed.num_patches
    layers = []
    for i, blk in enumerate(model.blocks):
        n_in, n_out = counts.get(i, (n0, n0))
        parts = split_block(scopes, i, isinstance(blk, ReducingBlock))
        layers.append(LayerFlops(i, n_in, n_out, *(p * g for p in parts)))
    total = _macs(scopes, "")
    stem = _macs(scopes, "patch_embed")
    blocks = sum(_macs(scopes, f"blocks.{i}") for i in range(len(model.blocks)))
    return FlopReport(
        total=total * g,
        layers=layers,
        stem=stem * g,
        head=(total - stem - blocks) * g,
        num_prefix=int(getattr(model, "num_prefix_tokens", 1)),
        params=sum(p.numel() for p in model.parameters()),
        uncounted=uncounted,
        counter=counter,
    )


@torch.no_grad()
def count_flops(model: nn.Module, img_size: int | None = None, counter: CounterName = "fvcore") -> FlopReport:
    """Count one image through ``model`` with ``counter`` ("fvcore" or "torch"); per-block GMACs.

    Runs on the model's device and dtype; the count does not depend on the weights.
    """
    if counter not in COUNTERS:
        raise TpoolError(f"unknown FLOP counter {counter!r}; choose from {', '.join(COUNTERS)}")
    param = next(model.parameters())
    x = torch.zeros(1, *_input_size(model, img_size), device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        if counter == "fvcore":
            scopes, uncounted = fvcore_scopes(model, x)
        else:
            from .flops_torch import torch_scopes

            scopes, uncounted = torch_scopes(model, x)
    finally:
        model.train(was_training)
    return report_from_scopes(model, scopes, uncounted, counter)


@dataclass
class Agreement:
    """How far two counters' reports are apart: the largest relative difference, and where."""

    reports: tuple[FlopReport, FlopReport]
    max_rel_diff: float
    where: str  # e.g. "block 3 attention", "total"

    @property
    def agree(self) -> bool:
        return self.max_rel_diff <= AGREEMENT_TOLERANCE


def _rel_diff(a: float, b: float) -> float:
    scale = max(abs(a), abs(b))
    return abs(a - b) / scale if scale > 0 else 0.0


def compare_reports(a: FlopReport, b: FlopReport) -> Agreement:
    """The largest relative difference over every column of every block, stem, head and total."""
    pairs: list[tuple[str, float, float]] = [("total", a.total, b.total), ("stem", a.stem, b.stem), ("head", a.head, b.head)]
    if len(a.layers) != len(b.layers):
        raise TpoolError(f"the counters saw different depths ({len(a.layers)} and {len(b.layers)} blocks)")
    for la, lb in zip(a.layers, b.layers):
        for column in ("attention", "mlp", "operator", "other", "total"):
            pairs.append((f"block {la.layer} {column}", getattr(la, column), getattr(lb, column)))
    where, x, y = max(pairs, key=lambda p: _rel_diff(p[1], p[2]))
    return Agreement((a, b), _rel_diff(x, y), where)


def compare_counters(model: nn.Module, img_size: Optional[int] = None) -> Agreement:
    """Count ``model`` with fvcore and with torch's counter and say how far apart they are."""
    return compare_reports(count_flops(model, img_size, "fvcore"), count_flops(model, img_size, "torch"))
