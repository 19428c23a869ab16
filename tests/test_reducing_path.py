"""The reducing path's values, pinned against an independent hand-written block.

The keep-1.0 tests only run timm's own block; here a patched block that reduces (and the block
after it, which runs on merged tokens with sizes, with and without proportional attention) must
equal a computation written out from the module's weights: norm1, qkv, q/k-norm, attention,
proj, LayerScale 1, the operator (called through its public entry point on the hand-computed
features), norm2, MLP, LayerScale 2. Written against the weights, not against the patch's code,
so a dropped LayerScale, a wrong residual or a wrong bias shows up as a value difference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_vit
from tpool_cli.ops import make_operator
from tpool_cli.ops.base import ReduceContext
from tpool_cli.patch import patch


def _randomise_layerscale(model: torch.nn.Module) -> None:
    """Non-trivial LayerScale: every gamma a different random value (init_values alone is one constant)."""
    g = torch.Generator().manual_seed(7)
    for blk in model.blocks:
        for ls in (blk.ls1, blk.ls2):
            if hasattr(ls, "gamma"):
                with torch.no_grad():
                    ls.gamma.copy_(torch.rand(ls.gamma.shape, generator=g) * 2 - 0.5)


def _deit3() -> torch.nn.Module:
    model = tiny_vit("deit3_small_patch16_224", init_values=0.5)
    _randomise_layerscale(model)
    return model


FAMILIES = {
    "vit_cls": lambda: tiny_vit(),
    "deit3_layerscale": _deit3,
    "registers_no_cls": lambda: tiny_vit(class_token=False, reg_tokens=4, global_pool="avg", qk_norm=True),
    "registers_cls": lambda: tiny_vit(reg_tokens=4),
    "deit_distilled": lambda: tiny_vit("deit_tiny_distilled_patch16_224"),
}
# (operator, options); cls-attention operators only where the model has a class token
OPERATORS = [("topk", {}), ("topk", {"score": "received"}), ("kmeans", {"iters": 2}), ("kmedoids", {"iters": 2}), ("tome", {}), ("evit", {}), ("grid", {})]


def _ln(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _gamma(ls: torch.nn.Module) -> torch.Tensor | float:
    return ls.gamma if hasattr(ls, "gamma") else 1.0


def _heads_qkv(blk, h):
    attn = blk.attn
    b, n, c = h.shape
    heads = attn.num_heads
    qkv = h @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0.0)
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    if isinstance(attn.q_norm, torch.nn.LayerNorm):
        q, k = _ln(attn.q_norm, q), _ln(attn.k_norm, k)
    return q, k, v


def hand_block(blk, x, p, sizes, prop_attn, operator, k_out, grid):
    """One pre-norm block from its weights; reduces the patch tokens to k_out when k_out is given.

    Returns (output tokens, sizes after the block, grid after the block).
    """
    b, n, c = x.shape
    h = _ln(blk.norm1, x)
    q, k, v = _heads_qkv(blk, h)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if prop_attn and sizes is not None:
        scores = scores + torch.cat([torch.zeros(b, p), sizes.log()], dim=1)[:, None, None, :]
    weights = scores.softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, c)
    out = out @ blk.attn.proj.weight.T + blk.attn.proj.bias
    x = x + _gamma(blk.ls1) * out
    if k_out is not None:
        patch_sizes = sizes if sizes is not None else torch.ones(b, n - p)
        ctx = ReduceContext(
            sizes=patch_sizes,
            grid=grid,
            cls_attn=weights[:, :, 0, p:].mean(dim=1),
            significance=weights[..., p:].sum(dim=(1, 2)),
            keys=k[:, :, p:].mean(dim=1),
            num_prefix=p,
        )
        red = operator(x[:, p:], k_out, ctx)
        x = torch.cat([x[:, :p], red.tokens], dim=1)
        sizes, grid = red.sizes, red.grid
    mlp = blk.mlp
    hidden = F.gelu(_ln(blk.norm2, x) @ mlp.fc1.weight.T + mlp.fc1.bias)
    x = x + _gamma(blk.ls2) * (hidden @ mlp.fc2.weight.T + mlp.fc2.bias)
    return x, sizes, grid


@pytest.mark.parametrize("prop_attn", [False, True], ids=["plain", "prop_attn"])
@pytest.mark.parametrize("op,options", OPERATORS, ids=[f"{o}{'-' + '-'.join(map(str, v.values())) if v else ''}" for o, v in OPERATORS])
@pytest.mark.parametrize("family", FAMILIES)
def test_reducing_blocks_equal_a_hand_written_block(family, op, options, prop_attn):
    model = FAMILIES[family]()
    if op in ("evit",) or options.get("score", "cls") == "cls" and op == "topk":
        if getattr(model, "cls_token", None) is None:
            pytest.skip("class-attention operator on a model without a class token")
    patch(model, op, keep=0.5, layers=(0, 1), prop_attn=prop_attn, **options)
    operator = make_operator(op, **options)
    p = model.num_prefix_tokens
    torch.manual_seed(3)
    x = torch.randn(2, p + 64, 64)
    with torch.no_grad():
        got0 = model.blocks[0](x)
        got1 = model.blocks[1](got0)
        sizes1 = model.tpool_state.sizes
        k0, k1 = model.tpool_state.counts[0][1], model.tpool_state.counts[1][1]
        want0, sizes, grid = hand_block(model.blocks[0].block, x, p, None, prop_attn, operator, k0, (8, 8))
        want1, sizes, _ = hand_block(model.blocks[1].block, want0, p, sizes, prop_attn, operator, k1, grid)
        # block 2 does not reduce but runs on merged tokens (the patch's path, not timm's block)
        got2 = model.blocks[2](got1)
        want2, _, _ = hand_block(model.blocks[2].block, want1, p, sizes, prop_attn, operator, None, None)
    assert got0.shape == want0.shape and got1.shape == want1.shape
    torch.testing.assert_close(got0, want0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got1, want1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got2, want2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sizes1, sizes)


def test_hand_written_block_sees_layerscale():
    """The DeiT-III case is not vacuous: its gammas are far from one and different per channel."""
    model = _deit3()
    gamma = model.blocks[0].ls2.gamma
    assert gamma.std() > 0.2 and (gamma - 1).abs().mean() > 0.3
