"""The second FLOP counter: torch's ``FlopCounterMode`` at the dispatcher, made complete for tpool.

fvcore traces with ``torch.jit`` (deprecated in torch 2.x); torch's own counter sees every aten op
as it is dispatched, with no tracing, but out of the box it misses what ViTs with token reduction
run (DeiT-S reads 4.2412 GMACs instead of 4.6083). Formulas added here, all in torch's FLOP units
(1 multiply-add = 2 FLOPs; :func:`torch_scopes` halves them into MACs) and equal to fvcore's count:

* fused attention kernels missing from torch's registry: the CPU kernel
  ``aten._scaled_dot_product_flash_attention_for_cpu`` and
  ``aten._scaled_dot_product_fused_attention_overrideable`` (QK^T + AV; the efficient, flash and
  cudnn CUDA kernels are in torch's registry with the same formula);
* layer norms (``aten.native_layer_norm``): fvcore's 5 per element (4 without affine);
* the scatter/index-adds operators pool tokens with: one add per source element;
* ``aten.linalg_vector_norm``: one multiply-add per input element (as ``vecdot(x, x)``);
* ``aten._cdist_forward``: N x M x D; ``torch.linalg.vecdot``: one multiply-add per element of the
  broadcast inputs. vecdot is a composite op that reaches the dispatcher as an elementwise
  multiply and a sum, so it is caught one level up, by a ``TorchFunctionMode``.

Attribution: torch's ``ModuleTracker`` credits an op to the modules currently running, not to the
module path; a block that calls ``attn.qkv`` directly (the reducing block) would not credit
``attn``. So each op is credited to its innermost running module and summed over name prefixes,
exactly as fvcore does, and the per-block columns of :mod:`tpool_cli.flops` come out the same.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _layer_norm_flops(input_shape, normalized_shape, weight_shape=None, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(input_shape) * (5 if weight_shape is not None else 4)


def _source_flops(self_shape, dim, index_shape, source_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(source_shape)


def _cdist_flops(x1_shape, x2_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x1_shape) * x2_shape[-2]


def _vector_norm_flops(self_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(self_shape)


# Kernels torch's registry misses, with the formula that fvcore's handles use (x 2: FLOPs).
TORCH_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    aten.native_layer_norm: _layer_norm_flops,
    aten.scatter_add: _source_flops,
    aten.scatter_add_: _source_flops,
    aten.index_add: _source_flops,
    aten.index_add_: _source_flops,
    aten._cdist_forward: _cdist_flops,
    aten.linalg_vector_norm: _vector_norm_flops,
}
if hasattr(aten, "_scaled_dot_product_fused_attention_overrideable"):
    TORCH_FORMULAS[aten._scaled_dot_product_fused_attention_overrideable] = _sdpa_flops

# Ops with no arithmetic (views, allocation, copies, comparisons, selection by index): not listed
# as uncounted, as fvcore does not list them either.
SILENT_OPS = frozenset(
    "view _unsafe_view reshape permute t transpose expand select slice unsqueeze unsqueeze_ squeeze unbind "
    "split split_with_sizes chunk narrow flatten cat stack clone contiguous copy_ _to_copy to detach alias "
    "lift_fresh as_strided empty empty_like new_empty zeros zeros_like new_zeros ones ones_like full "
    "full_like new_full arange scalar_tensor fill_ gather index index_select_backward eq ne gt ge lt_ "
    "bitwise_not bitwise_and bitwise_or __and__ max clamp clamp_ dropout masked_fill roll floor floor_divide "
    "remainder nonzero constant_pad_nd relu relu_ index_put_ _local_scalar_dense".split()
)


class _ScopedFlopCounter(FlopCounterMode):
    """FlopCounterMode that credits each op to its innermost running module and logs the rest."""

    def __init__(self) -> None:
        super().__init__(display=False, custom_mapping=TORCH_FORMULAS)
        self.leaf_flops: dict[str, Counter] = defaultdict(Counter)  # innermost module -> op -> FLOPs
        self.uncounted: Counter = Counter()

    def credit(self, op: str, flops: int) -> None:
        innermost = max(self.mod_tracker.parents, key=lambda name: (name != "Global", name.count("."), len(name)))
        self.leaf_flops[innermost][op] += flops

    def _count_flops(self, func_packet, out, args, kwargs):  # called by FlopCounterMode for every executed op
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            self.credit(str(func_packet), int(flops))
        elif func_packet.__name__ not in SILENT_OPS:
            self.uncounted[str(func_packet)] += 1
        return out


class _VecdotMode(TorchFunctionMode):
    """Counts ``torch.linalg.vecdot`` before it decomposes into an elementwise multiply and a sum."""

    def __init__(self, counter: _ScopedFlopCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.linalg.vecdot:
            x, y = args[0], (args[1] if len(args) > 1 else kwargs["y"])
            self.counter.credit("torch.linalg.vecdot", 2 * math.prod(torch.broadcast_shapes(x.shape, y.shape)))
        return func(*args, **kwargs)


def _fvcore_name(module_path: str, root: str) -> str:
    """ModuleTracker's "VisionTransformer.blocks.3.attn" -> fvcore's "blocks.3.attn" (root and Global: "")."""
    if module_path in ("Global", root):
        return ""
    return module_path[len(root) + 1 :] if module_path.startswith(root + ".") else module_path


def _inclusive(leaf_macs: dict[str, Counter]) -> dict[str, Counter]:
    """Sum each innermost module's counts into every name prefix ("" = the model), as fvcore does."""
    scopes: dict[str, Counter] = defaultdict(Counter)
    for name, ops in leaf_macs.items():
        parts = name.split(".") if name else []
        for depth in range(len(parts) + 1):
            scopes[".".join(parts[:depth])].update(ops)
    return dict(scopes)


@torch.no_grad()
def torch_scopes(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, Counter], dict[str, int]]:
    """MACs per module scope and op from torch's dispatcher-level counter, and the uncounted ops."""
    counter = _ScopedFlopCounter()
    # ModuleTracker hooks the backward of module inputs that require grad; a parameter passed as a
    # module input (the latent query of timm's attention pooling) has no grad_fn and breaks it.
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        with counter, _VecdotMode(counter):
            model(x)
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
    root = type(model).__name__
    leaf_macs: dict[str, Counter] = defaultdict(Counter)
    for path, ops in counter.leaf_flops.items():
        for op, flops in ops.items():
            leaf_macs[_fvcore_name(path, root)][op] += flops // 2
    return _inclusive(leaf_macs), dict(counter.uncounted)
