"""PiToMe, ToFu and MCTF: their rules on constructed examples, hand computations, shared invariants.

Equivalence with the reference merge functions (hchautran/PiToMe, mlvlab/MCTF) on random inputs
was checked outside the suite (their code is not vendored); docs/operators.md gives the figures.
"""

import math

import pytest
import torch

from conftest import tiny_vit
from tpool_cli.ops import make_operator
from tpool_cli.ops.base import ReduceContext
from tpool_cli.ops.mctf import edge_weights, fusion_assignment
from tpool_cli.ops.pitome import energy_scores
from tpool_cli.patch import patch, unpatch

OPS = ["pitome", "tofu", "mctf"]


def context(b, n, *, seed=0, layer=0, depth=4, num_prefix=1, sizes=None):
    g = torch.Generator().manual_seed(seed)
    return ReduceContext(
        sizes=torch.randint(1, 4, (b, n), generator=g).float() if sizes is None else sizes,
        keys=torch.randn(b, n, 6, generator=g),
        received=torch.rand(b, num_prefix + n, generator=g) + 0.01,
        layer=layer,
        depth=depth,
        num_prefix=num_prefix,
    )


# ---------------------------------------------------------------- PiToMe


def test_pitome_energy_matches_a_hand_computation():
    keys = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    energy, _ = energy_scores(keys, margin=0.5, alpha=1.0)
    c = 1 / math.sqrt(2)
    elu = lambda v: v if v > 0 else math.expm1(v)  # noqa: E731
    want = [
        (elu(0.5) + elu(c - 0.5) + elu(-0.5)) / 3,
        (elu(c - 0.5) + elu(0.5) + elu(c - 0.5)) / 3,
        (elu(-0.5) + elu(c - 0.5) + elu(0.5)) / 3,
    ]
    assert torch.allclose(energy[0], torch.tensor(want), atol=1e-6)


@pytest.mark.parametrize("layer", [0, 3])  # bsm rule (first half), then PiToMe's protected rule
def test_pitome_protects_the_isolated_low_energy_tokens(layer):
    """Ten tokens in one tight cluster (high energy), four mutually orthogonal loners (low energy):
    the reference merges among the high-energy tokens, so the loners come out untouched, each alone."""
    g = torch.Generator().manual_seed(0)
    n, d = 14, 8
    keys = torch.zeros(1, n, d)
    keys[0, :10, 0] = 1.0
    keys[0, :10] += 0.01 * torch.randn(10, d, generator=g)
    loners = [10, 11, 12, 13]
    for j, i in enumerate(loners):
        keys[0, i, 1 + j] = 1.0
    x = torch.randn(1, n, 5, generator=g)
    ctx = ReduceContext(sizes=torch.ones(1, n), keys=keys, layer=layer, depth=4, num_prefix=1)
    energy, _ = energy_scores(keys, 0.75, 1.0)
    assert energy[0, loners].max() < energy[0, :10].min()
    out = make_operator("pitome").reduce(x, n - 4, ctx)
    counts = torch.bincount(out.assignment[0], minlength=n - 4)
    for i in loners:
        slot = out.assignment[0, i]
        assert counts[slot] == 1 and torch.equal(out.tokens[0, slot], x[0, i])
    assert torch.equal(out.sizes.sum(1), torch.full((1,), float(n)))


def test_pitome_schedule_follows_the_reference_timm_patch():
    op = make_operator("pitome")
    assert [op.uses_bsm(i, 12) for i in range(12)] == [True] * 6 + [False] * 6
    assert [op.uses_bsm(i, 3) for i in range(3)] == [True, True, False]  # ceil(depth / 2)
    assert [round(op.block_margin(i, 12), 6) for i in (0, 6, 11)] == [0.75, 0.375, round(0.75 / 12, 6)]
    assert make_operator("pitome", margin_schedule="constant").block_margin(11, 12) == 0.75
    assert [make_operator("pitome", bsm_blocks="last_half").uses_bsm(i, 4) for i in range(4)] == [False, False, True, True]
    assert op.realise(15, 2, None) == 8 and op.realise(16, 12, None) == 12


# ---------------------------------------------------------------- ToFu


def test_tofu_splits_prune_and_merge_blocks_as_the_reference():
    op = make_operator("tofu")
    assert [op.prunes(i, 12) for i in range(12)] == [True] * 7 + [False] * 5  # 'tofu' if i > depth // 2
    assert [op.prunes(i, 4) for i in range(4)] == [True, True, True, False]
    assert [make_operator("tofu", merge_start=1).prunes(i, 4) for i in range(4)] == [True, False, False, False]


def test_tofu_prunes_early_and_merges_late_through_the_patch(images):
    model = tiny_vit()  # depth 4: blocks 0-2 prune, block 3 merges
    patch(model, "tofu", keep=0.8, layers=(1, 3), track=True)
    with torch.no_grad():
        model(images)
    st = model.tpool_state
    after_prune, after_merge = st.history
    dropped = (after_prune < 0).sum(1)
    assert torch.all(dropped == 64 - st.counts[1][1])  # block 1 dropped exactly r tokens
    assert torch.equal(after_merge < 0, after_prune < 0)  # block 3 dropped nothing more: it merged
    assert torch.all(st.sizes.sum(1) == 64 - dropped)


def test_tofu_prune_keeps_rows_unchanged_and_merge_rescales_the_norm():
    x = torch.randn(2, 12, 5, generator=torch.Generator().manual_seed(3))
    ctx = context(2, 12, seed=3, layer=0)
    pruned = make_operator("tofu").reduce(x, 8, ctx)
    kept = pruned.assignment >= 0
    assert torch.all(kept.sum(1) == 8)
    for b in range(2):
        assert torch.equal(pruned.tokens[b, pruned.assignment[b, kept[b]]], x[b, kept[b]])
    merge_ctx = context(2, 12, seed=3, layer=3)
    for norm in ("reference", "mlerp"):
        out = make_operator("tofu", norm=norm).reduce(x, 8, merge_ctx)
        assert torch.all(out.assignment >= 0)
        for b in range(2):
            for slot in range(8):
                members = (out.assignment[b] == slot).nonzero().flatten()
                mean = x[b, members].mean(0)
                largest = x[b, members].norm(dim=-1).max()
                evens = members[members % 2 == 0]  # the B token has an even patch index (one prefix token)
                anchor = x[b, evens if len(evens) else members].norm()  # a kept A token is its own anchor
                want = mean / (mean.norm() if norm == "mlerp" else anchor) * largest
                assert torch.allclose(out.tokens[b, slot], want, atol=1e-5)
                if norm == "mlerp":
                    assert torch.isclose(out.tokens[b, slot].norm(), largest, atol=1e-5)


# ---------------------------------------------------------------- MCTF


def test_mctf_criteria_match_a_hand_computation():
    """One class token + 4 patches: sequence positions 1..4, so A = patches 1, 3 and B = patches 0, 2."""
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
    received = torch.tensor([[0.4, 0.1, 0.2, 0.25, 0.05]])  # class token first
    sizes = torch.tensor([[1.0, 2.0, 4.0, 1.0]])
    got = edge_weights(metric, received, sizes, 1, (1.0, 20.0, 40.0))
    unit = metric[0] / metric[0].norm(dim=-1, keepdim=True)
    inv = [1 / float(v) for v in received[0]]
    info = [v / max(inv) for v in inv[1:]]  # the max includes the class token
    inv_size = [1 / float(s) for s in sizes[0]]  # the class token's size 1 sets the max to 1
    want = torch.zeros(2, 2)
    for i, a in enumerate([1, 3]):
        for j, b in enumerate([0, 2]):
            sim = ((float(unit[a] @ unit[b]) + 1) / 2) ** 1.0
            want[i, j] = sim * (info[a] * info[b]) ** (1 / 20) * (inv_size[a] * inv_size[b]) ** (1 / 40)
    assert torch.allclose(got[0], want, atol=1e-6)


def test_mctf_bidirectional_fusion_on_a_hand_built_score_table():
    # A = patches 1, 3, 5; B = patches 0, 2, 4 (one prefix token). r = 2: one A -> B, then one B -> A.
    scores = torch.tensor([[[0.9, 0.1, 0.2], [0.3, 0.2, 0.8], [0.1, 0.5, 0.4]]])
    assignment = fusion_assignment(scores, 2, True, True, 6, 1)
    # A->B: A0 (best 0.9) fuses into B0. Kept A: A1, A2 (slots 0, 1). B->A by the same table over the
    # kept A rows: B0 best 0.3 (A1), B1 0.5 (A2), B2 0.8 (A1): B2 fuses into A1 (slot 0); B1, B0 stay
    # (slots 2, 3, best match first), and A0 follows B0.
    patch_of = {"A0": 1, "A1": 3, "A2": 5, "B0": 0, "B1": 2, "B2": 4}
    want = {"A0": 3, "A1": 0, "A2": 1, "B0": 3, "B1": 2, "B2": 0}
    assert {name: int(assignment[0, j]) for name, j in patch_of.items()} == want


def test_mctf_pools_by_attention_times_size():
    x = torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(1))
    ctx = context(1, 6, seed=1)
    out = make_operator("mctf").reduce(x, 4, ctx)
    w = ctx.received[0, 1:] * ctx.sizes[0]
    for slot in range(4):
        members = out.assignment[0] == slot
        want = (w[members, None] * x[0, members]).sum(0) / w[members].sum()
        assert torch.allclose(out.tokens[0, slot], want, atol=1e-6)
        assert out.sizes[0, slot] == ctx.sizes[0, members].sum()


# ---------------------------------------------------------------- shared invariants


@pytest.mark.parametrize("op", OPS)
def test_keep_one_is_the_identity_through_the_patch(op, images):
    model = tiny_vit()
    with torch.no_grad():
        plain = model(images)
        patch(model, op, keep=1.0)
        same = model(images)
        unpatch(model)
    assert torch.equal(plain, same)


@pytest.mark.parametrize("op", OPS + ["atc", "dpcknn"])  # the clustering peers share the invariant
@pytest.mark.parametrize("layer", [0, 3])
def test_batch_independence_and_sizes(op, layer):
    x = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(5))
    ctx = context(3, 20, seed=5, layer=layer)
    out = make_operator(op).reduce(x, 13, ctx)
    for b in range(3):
        one = ReduceContext(
            sizes=ctx.sizes[b : b + 1], keys=ctx.keys[b : b + 1], received=ctx.received[b : b + 1],
            layer=layer, depth=4, num_prefix=1,
        )
        alone = make_operator(op).reduce(x[b : b + 1], 13, one)
        assert torch.equal(alone.assignment[0], out.assignment[b])
        assert torch.allclose(alone.tokens[0], out.tokens[b], atol=1e-6)
    kept = out.assignment >= 0
    assert torch.allclose(out.sizes.sum(1), (ctx.sizes * kept).sum(1))
    if make_operator(op).merges or layer == 3:
        assert torch.all(kept) and torch.equal(out.sizes.sum(1), ctx.sizes.sum(1))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layer", [0, 3])
def test_merging_identical_tokens_changes_nothing(op, layer):
    x = torch.randn(1, 1, 8).expand(2, 16, 8).contiguous()
    out = make_operator(op).reduce(x, 9, context(2, 16, seed=2, layer=layer))
    assert torch.allclose(out.tokens, x[:, :9], atol=1e-6)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_tiny_vit_runs_at_keep_07(op, dtype, images):
    model = tiny_vit().to(dtype)
    patch(model, op, keep=0.7)
    with torch.no_grad():
        logits = model(images.to(dtype))
    assert logits.shape == (3, 10) and torch.isfinite(logits.float()).all()
    counts = [model.tpool_state.counts[i] for i in range(4)]
    assert counts[-1][1] < 64
