"""Pooling heads that count token sizes after a merge (timm's ``pool``: avg, avgmax, max, map).

After a merge a token stands for ``size`` original patches. timm's heads average the tokens as
if each were one patch; here, once the patch has reduced (``state.sizes`` set):

* ``avg``: the size-weighted mean of the patch tokens, i.e. the mean over the original patches
  (prefix tokens, when the model pools them too, count one each). After a pruning every kept
  token has size 1, so this is the plain mean of the kept tokens.
* ``avgmax``: 0.5 * (max + the size-weighted mean); ``max``: the channel-wise max over the
  tokens, unchanged (a merged token's channels are means of its members', so the max is over
  means: it is not the max over the original patches, and cannot be recovered).
* ``map`` (``AttentionPoolLatent``): log(size) added to its attention logits, so its latent query
  attends to a merged token as to the patches it stands for; applied whenever the operator merges
  or proportional attention is on (a pruning with proportional attention off adds log 1 = 0).
* ``token``: the class token, unchanged.

Until the first reduction the model's own ``pool`` runs, so keep 1.0 stays bit-identical.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn


def size_weighted_mean(x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Mean of x (B x N x C) over the original patches its tokens stand for (sizes B x N)."""
    w = sizes.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(torch.finfo(x.dtype).tiny)


def sized_global_pool(x: torch.Tensor, sizes: torch.Tensor, pool_type: str, num_prefix: int, include_prefix: bool) -> torch.Tensor:
    """timm's ``global_pool_nlc`` with the average weighted by token sizes (see the module docstring)."""
    if not pool_type:
        return x
    if pool_type == "token":
        return x[:, 0]
    if include_prefix:
        sizes = torch.cat([torch.ones(x.shape[0], num_prefix, device=x.device, dtype=sizes.dtype), sizes], dim=1)
    else:
        x = x[:, num_prefix:]
    if pool_type == "avg":
        return size_weighted_mean(x, sizes)
    if pool_type == "avgmax":
        return 0.5 * (x.amax(dim=1) + size_weighted_mean(x, sizes))
    if pool_type == "max":
        return x.amax(dim=1)
    raise ValueError(f"unknown pool type {pool_type!r}")


def size_bias(sizes: torch.Tensor, num_prefix: int, dtype: torch.dtype) -> torch.Tensor:
    """log(size) logit bias, B x 1 x 1 x (prefix + N): 0 for the ``num_prefix`` leading tokens."""
    zeros = torch.zeros(sizes.shape[0], num_prefix, device=sizes.device, dtype=torch.float32)
    return torch.cat([zeros, sizes.float().log()], dim=1)[:, None, None, :].to(dtype)


def make_sized_pool(model: nn.Module, state: Any, merges: bool) -> Callable[..., torch.Tensor]:
    """A replacement for ``model.pool`` that counts sizes once the patch has reduced (else the original)."""
    original = model.pool  # the bound class method

    def pool(x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        sizes = state.sizes
        if sizes is None:
            return original(x, pool_type)
        p = model.num_prefix_tokens
        include = bool(getattr(model, "pool_include_prefix", False))
        if model.attn_pool is not None:
            if not (merges or state.prop_attn):
                return original(x, pool_type)
            if not include:
                x = x[:, p:]
            return model.attn_pool(x, attn_mask=size_bias(sizes, p if include else 0, x.dtype))
        kind = model.global_pool if pool_type is None else pool_type
        return sized_global_pool(x, sizes, kind, p, include)

    return pool


def install_sized_pool(model: nn.Module, state: Any, merges: bool) -> None:
    """Shadow ``model.pool`` (ViT and Eva both pool through it in ``forward_head``)."""
    if callable(getattr(type(model), "pool", None)):
        model.__dict__["pool"] = make_sized_pool(model, state, merges)


def remove_sized_pool(model: nn.Module) -> None:
    model.__dict__.pop("pool", None)
