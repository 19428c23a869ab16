"""MCTF's one-step-ahead attention through the patch, against a hand-written encoding of the reference.

The reference (mlvlab/MCTF at 2004da0, ``models/modules/blocks.py`` ``Block_DEIT.forward`` with
``one_step_ahead == 1``, ``models/SA/MHSA.py``, ``utils/mctf.py`` ``bipartite_soft_matching`` and
``merge_wavg(pooling_type=1, one_step_ahead=1)``) is re-encoded below from its code, in its own
form (strided A/B split of the whole sequence, ``-inf`` rows for the protected class token,
``scatter_reduce`` merges applied to the key then the query axis of the attention matrix), not
from tpool's functions, and run on a tiny timm ViT's own weights.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_vit
from tpool_cli.flops import compare_counters, count_flops
from tpool_cli.ops import make_operator
from tpool_cli.ops.common import pool_attention
from tpool_cli.patch import patch, unpatch

TAUS = (1.0, 20.0, 40.0)


# ---------------------------------------------------------------- the reference, re-encoded


def ref_matching(metric, attn, size, r, taus, bidirection=True):
    """The reference's ``bipartite_soft_matching`` (one protected class token): the merge function."""
    tau_sim, tau_info, tau_size = taus
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = ((a @ b.transpose(-1, -2) + 1) / 2) ** (1 / tau_sim)
    info = 1 / attn.mean(dim=[1, 2])
    info = info / info.max(1, keepdim=True)[0]
    scores = scores * (info[..., ::2, None] * info[..., 1::2, None].transpose(1, 2)) ** (1 / tau_info)
    if size is not None:
        s = 1 / size
        s = s / s.max(1, keepdim=True)[0]
        scores = scores * (s[..., ::2, :] * s[..., 1::2, :].transpose(1, 2)) ** (1 / tau_size)
    scores[..., :1, :] = -math.inf
    t1, t2 = scores.shape[1:]
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r1:, :], edge_idx[..., :r1, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    unm_idx = unm_idx.sort(dim=1)[0]
    if bidirection:
        new_scores = scores.gather(dim=-2, index=unm_idx.repeat(1, 1, t2)).transpose(1, 2)
        node_max2, node_idx2 = new_scores.max(dim=-1)
        edge_idx2 = node_max2.sort(dim=-1, descending=True)[1][..., None]
        unm_idx2, src_idx2 = edge_idx2[..., r2:, :], edge_idx2[..., :r2, :]
        dst_idx2 = node_idx2[..., None].gather(dim=-2, index=src_idx2)

    def lift(idx, like):  # B x t x 1 -> B x 1 ... x t x 1, as the reference's dim_match
        while idx.dim() < like.dim():
            idx = idx.unsqueeze(1)
        return idx

    def merge(x, mode="sum"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        lead, c = src.shape[:-2], src.shape[-1]

        def ex(idx, t):
            return lift(idx, src).expand(*lead, t, c)

        unm = src.gather(-2, ex(unm_idx, t1 - r1))
        src = src.gather(-2, ex(src_idx, r1))
        dst = dst.scatter_reduce(-2, ex(dst_idx, r1), src, reduce=mode)
        if not bidirection:
            return torch.cat([unm, dst], dim=-2)
        unm2 = dst.gather(-2, ex(unm_idx2, t2 - r2))
        src2 = dst.gather(-2, ex(src_idx2, r2))
        dst2 = unm.scatter_reduce(-2, ex(dst_idx2, r2), src2, reduce=mode)
        return torch.cat([dst2, unm2], dim=-2)

    return merge


def ref_merge_wavg_one_step_ahead(merge, x, size, attn):
    """``merge_wavg(pooling_type=1, one_step_ahead=1)``: fused tokens, sizes, fused attention matrix."""
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    size_max = size.amax(dim=-2, keepdim=True)
    attn_m = attn.mean(dim=[1, 2]).unsqueeze(-1)
    norm = merge(attn_m * (size / size_max), mode="sum")
    attn_n = merge(attn[..., None], mode="sum").squeeze(-1)
    attn_n = merge(attn_n * attn_m[:, None] * (size / size_max)[:, None], mode="sum").squeeze(-1)
    attn_n = attn_n / norm[:, None]
    x = merge(x * attn_m * (size / size_max), mode="sum") / norm
    return x, merge(size, mode="sum"), attn_n


def ref_attention(blk, x, size):
    """``MHSA.forward(_attn=True)``: softmax(q k^T * scale + log size) from q and k only."""
    attn = blk.attn
    b, n, c = x.shape
    qk = (x @ attn.qkv.weight.T[:, : 2 * c] + attn.qkv.bias[: 2 * c]).reshape(b, n, 2, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = (qk[0] @ qk[1].transpose(-2, -1)) * attn.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    return logits.softmax(dim=-1)


def ref_block(blk, x, size, r):
    """``Block_DEIT.forward`` with one-step-ahead on (r = 0: no fusion, the plain block)."""
    if r == 0:
        h = blk.norm1(x)
        attn = ref_attention(blk, h, size)
        v = (h @ blk.attn.qkv.weight.T[:, 2 * x.shape[-1] :] + blk.attn.qkv.bias[2 * x.shape[-1] :])
        out, size_out = attn @ v.reshape(*x.shape[:2], blk.attn.num_heads, -1).transpose(1, 2), size
    else:
        attn = ref_attention(blk, blk.norm1(x), size)
        merge = ref_matching(x, attn, size, r, TAUS)
        x, size_out, attn_n = ref_merge_wavg_one_step_ahead(merge, x, size, attn)
        h = blk.norm1(x)
        c = x.shape[-1]
        v = (h @ blk.attn.qkv.weight.T[:, 2 * c :] + blk.attn.qkv.bias[2 * c :]).reshape(*x.shape[:2], blk.attn.num_heads, -1)
        out = attn_n @ v.transpose(1, 2)
    out = blk.attn.proj(out.transpose(1, 2).reshape(x.shape))
    x = x + blk.ls1(out)
    return x + blk.ls2(blk.mlp(blk.norm2(x))), size_out


def ref_features(model, images, rs):
    """Every output token (final norm applied) of the reference model with r_i fused in block i."""
    x = model._pos_embed(model.patch_embed(images))
    size = None
    for blk, r in zip(model.blocks, rs):
        x, size = ref_block(blk, x, size, r)
    return model.norm(x)


def sharpened(model, factor=3.0):
    """Scale q and k up: a random-init ViT attends almost uniformly, so the attention weights of the
    fusion (and of the pooled rows) would hardly differ from size weights; sharper attention makes
    a wrong row weighting show (pooling rows by size moves the tokens by 1.3e-3 to 3e-3 here, and
    the class-token logits by as little as 3e-7: hence every token is compared, not the logits)."""
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * blk.attn.qkv.weight.shape[1]] *= factor
    return model


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("rs", [(0, 8, 8), (16, 10, 4)], ids=["official-layers", "from-block-0"])
@pytest.mark.parametrize("family", ["vit", "deit3_layerscale"])
def test_one_step_ahead_matches_the_reference_block(rs, family):
    """Every output token and the per-block token counts of the patched model = the hand-written
    reference, fp32 CPU (r_0 = 0 is the official layer choice: no fusion in block 0)."""
    overrides = dict(depth=3, qkv_bias=True) | ({"init_values": 0.5} if family == "deit3_layerscale" else {})
    model = tiny_vit("deit3_small_patch16_224" if family == "deit3_layerscale" else "vit_tiny_patch16_224", **overrides)
    model = sharpened(model)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref_features(model, images, rs)
        patch(model, "mctf", r=rs)
        got = model.forward_features(images)
    assert model.tpool_operator.one_step_ahead
    n, counts = 64, []
    for r in rs:
        counts.append((n, n - r))
        n -= r
    assert [model.tpool_state.counts[i] for i in range(3)] == counts
    assert (got - want).abs().max().item() < 1e-5


def test_the_reference_placement_without_one_step_ahead_differs():
    """The option is live: off, the block reduces between attention and MLP (the earlier behaviour)."""
    model = tiny_vit(depth=3)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        on = patch(model, "mctf", r=(0, 8, 8))(images)
        off = patch(model, make_operator("mctf", one_step_ahead=False), r=(0, 8, 8))(images)
    assert model.tpool_state.counts[2] == (56, 48)
    assert (on - off).abs().max().item() > 1e-4


@pytest.mark.parametrize("schedule", [{"keep": 1.0}, {"r": 0}])
def test_identity_schedules_stay_bit_identical(schedule):
    model = tiny_vit(depth=3)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model(images)
        same = patch(model, "mctf", **schedule)(images)
        unpatch(model)
    assert torch.equal(plain, same)


def test_pool_attention_rows_stay_distributions_and_identity_changes_nothing():
    """Pooled by a merge, every row still sums to 1 (columns summed, rows averaged); the identity
    assignment gives the matrix back; prefix rows are copied."""
    g = torch.Generator().manual_seed(0)
    attn = torch.randn(2, 3, 7, 7, generator=g).softmax(-1)
    weights = torch.rand(2, 6, generator=g) + 0.1
    same = pool_attention(attn, torch.arange(6).expand(2, 6), weights, 6, 1)
    assert torch.allclose(same, attn, atol=1e-6)
    assignment = torch.tensor([[0, 0, 1, 2, 2, 3], [3, 2, 1, 0, 0, 0]])
    pooled = pool_attention(attn, assignment, weights, 4, 1)
    assert pooled.shape == (2, 3, 5, 5)
    assert torch.allclose(pooled.sum(-1), torch.ones(2, 3, 5), atol=1e-6)
    assert torch.allclose(pooled[0, :, 0, 1], attn[0, :, 0, 1] + attn[0, :, 0, 2])  # columns of group 0 summed
    row = (attn[0, :, 1, :] * weights[0, 0] + attn[0, :, 2, :] * weights[0, 1]) / (weights[0, 0] + weights[0, 1])
    assert torch.allclose(pooled[0, :, 1, 0], row[:, 0])


def test_profile_counts_the_one_step_ahead_work():
    """Both counters agree, and the reducing block costs what its ops do: q, k on the unfused tokens,
    QK^T on them, v, AV, proj and MLP on the fused ones (C = 64, H = 2, D = 32, MLP 4C)."""
    model = patch(tiny_vit(depth=2), "mctf", r=(16, 0))
    assert compare_counters(model).agree
    block = count_flops(model, counter="torch").layers[0]
    t, t2, c = 65, 49, 64
    attention = t * c * 2 * c + t * t * c + t2 * c * c + t2 * t2 * c + t2 * c * c  # qk, QK^T, v, AV, proj
    mlp = t2 * c * 4 * c * 2
    assert abs(block.attention * 1e9 - attention) < 0.5
    assert abs(block.mlp * 1e9 - mlp) < 0.5
    assert block.operator > 0


@pytest.mark.parametrize("family", ["vit_cls", "registers", "eva02", "rope_mixed", "dinov3"])
def test_adapters_project_q_k_and_v_alone_as_their_qkv_does(family):
    """The reduce-before-attention path forms q, k (with rope) on the unfused tokens and v on the fused
    ones through ``qk``/``values``: they equal the family's full ``qkv`` (biases, q/k-norm, rope),
    and the Eva model runs one-step-ahead MCTF with the planned token counts."""
    from test_families import FAMILIES

    model = FAMILIES[family]()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seen = {}
    model.blocks[1].register_forward_pre_hook(lambda mod, args, kwargs: seen.update(x=args[0], rope=kwargs.get("rope")), with_kwargs=True)
    with torch.no_grad():
        model.forward_features(images)
        patch(model, "mctf", keep=0.7, layers=(1, 2))
        out = model(images)
        blk = model.blocks[1]
        h = blk.adapter.norm1(blk.block, seen["x"])
        q, k, v = blk.adapter.qkv(blk.block, h, seen["rope"], model.num_prefix_tokens)
        q2, k2 = blk.adapter.qk(blk.block, h, seen["rope"], model.num_prefix_tokens)
        v2 = blk.adapter.values(blk.block, h)
    for want, got in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out).all()
    assert [model.tpool_state.counts[i] for i in range(3)] == [(64, 64), (64, 44), (44, 31)]
