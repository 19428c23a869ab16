"""ToMe and EViT against loop references; every operator in fp32/bf16 at batch 1 and 3."""

import math

import pytest
import torch

from conftest import FAMILIES, tiny_vit
from tpool_cli.ops import make_operator, operator_names
from tpool_cli.ops.base import ReduceContext
from tpool_cli.ops.evit import evit_tokens
from tpool_cli.ops.tome import max_merges
from tpool_cli.patch import patch, planned_counts


def problem(seed, b=3, n=15, c=6, d=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g)
    sizes = torch.randint(1, 5, (b, n), generator=g).float()
    keys = torch.randn(b, n, d, generator=g)
    attn = torch.rand(b, n, generator=g).softmax(dim=1)
    return x, sizes, keys, attn


def weighted_mean(x, weights, members):
    total = sum(float(weights[i]) for i in members)
    return [sum(float(weights[i]) * float(x[i][d]) for i in members) / total for d in range(len(x[0]))]


# ---------------------------------------------------------------- ToMe


def ref_tome(x, sizes, keys, r, p=0):
    """ToMe's bipartite soft matching on one image with Python loops (float64), over the whole
    sequence [p prefix tokens, patches]: A = even positions, B = odd; prefix never merged."""
    n = len(x)
    unit = [[v / math.sqrt(sum(u * u for u in k)) for v in k] for k in keys]
    side_a = [j for j in range(n) if (p + j) % 2 == 0]
    side_b = [j for j in range(n) if (p + j) % 2 == 1]
    best, partner = {}, {}
    for i in side_a:
        scores = [sum(a * b for a, b in zip(unit[i], unit[j])) for j in side_b]
        top = max(range(len(side_b)), key=lambda t: (scores[t], -t))  # first maximum, as torch.max
        best[i], partner[i] = scores[top], side_b[top]
    by_score = sorted(side_a, key=lambda i: (-best[i], i))
    merged = set(by_score[:r])
    unmerged = sorted(by_score[r:]) if p else by_score[r:]  # ToMe sorts them back with a class token
    groups = [[i] for i in unmerged] + [[j] + [i for i in side_a if i in merged and partner[i] == j] for j in side_b]
    assignment = [None] * n
    for g, members in enumerate(groups):
        for i in members:
            assignment[i] = g
    tokens = [weighted_mean(x, sizes, members) for members in groups]
    return assignment, tokens, [sum(float(sizes[i]) for i in members) for members in groups]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("p", [0, 1, 2, 5])
@pytest.mark.parametrize("n, k", [(15, 10), (16, 9), (16, 8), (7, 5)])
def test_tome_matches_the_loop_reference(seed, p, n, k):
    x, sizes, keys, _ = problem(seed, n=n)
    out = make_operator("tome")(x, k, ReduceContext(sizes=sizes, keys=keys, track=True, num_prefix=p))
    assert out.tokens.shape == (3, k, 6)
    for i in range(3):
        ref_a, ref_tokens, ref_sizes = ref_tome(x[i].tolist(), sizes[i].tolist(), keys[i].tolist(), n - k, p)
        assert out.assignment[i].tolist() == ref_a
        assert torch.allclose(out.tokens[i], torch.tensor(ref_tokens, dtype=torch.float32), atol=1e-5)
        assert out.sizes[i].tolist() == ref_sizes


def angle_keys(degrees):
    t = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([t.cos(), t.sin()], dim=-1).float()[None]


def test_tome_pairs_by_hand_one_prefix_token():
    """9 tokens = [cls, 8 patches]: A = patches 1,3,5,7 (even sequence positions), B = 0,2,4,6.
    Best partners: 1->2 (10 deg), 3->2 (12), 5->4 (3), 7->2 (30); r = 3 merges 5, 1, 3."""
    keys = angle_keys([100, 10, 0, -12, 200, 203, 280, 330])
    x = torch.arange(8.0).view(1, 8, 1)
    out = make_operator("tome").reduce(x, 5, ReduceContext(sizes=torch.ones(1, 8), keys=keys, num_prefix=1))
    # outputs: [7] (unmerged A), then B: [0], [2,1,3], [4,5], [6]
    assert out.assignment.tolist() == [[1, 2, 2, 2, 3, 3, 4, 0]]
    assert out.tokens.flatten().tolist() == [7.0, 0.0, 2.0, 4.5, 6.0]
    assert out.sizes.tolist() == [[1.0, 1.0, 3.0, 2.0, 1.0]]


def test_tome_pairs_by_hand_two_prefix_tokens():
    """9 tokens = [cls, dist, 7 patches]: A = patches 0,2,4,6, B = 1,3,5 (dist is B's first, never a
    destination). Best partners: 0->1 (90 deg), 2->1 (10), 4->5 (3), 6->3 (68)."""
    keys = angle_keys([100, 10, 0, -12, 200, 203, 280])
    x = torch.arange(7.0).view(1, 7, 1)
    ctx = ReduceContext(sizes=torch.ones(1, 7), keys=keys, num_prefix=2)
    out = make_operator("tome").reduce(x, 5, ctx)  # r = 2: 4->5, 2->1
    assert out.assignment.tolist() == [[0, 2, 2, 3, 4, 4, 1]]  # [0], [6], [1,2], [3], [5,4]
    assert out.tokens.flatten().tolist() == [0.0, 6.0, 1.5, 3.0, 4.5]
    out = make_operator("tome").reduce(x, 4, ctx)  # r = 3 = the cap floor(7 / 2): also 6->3
    assert out.assignment.tolist() == [[0, 1, 1, 2, 3, 3, 2]]


def test_tome_cap_is_half_the_patch_tokens_rounded_down():
    """ToMe: r = min(r, (tokens - protected) // 2), for odd and even patch counts."""
    op = make_operator("tome")
    assert [max_merges(n) for n in (64, 7, 8, 1, 2)] == [32, 3, 4, 0, 1]
    assert op.realise(64, 40, None) == 40
    assert op.realise(64, 10, None) == 32
    assert op.realise(7, 1, None) == 4  # 3 merges of 7
    assert op.realise(197, 1, None) == 99
    assert op.realise(2, 1, None) == 1 and op.realise(1, 1, None) == 1
    for p in (0, 1, 2):
        x, sizes, keys, _ = problem(3, n=7)
        out = op.reduce(x, 1, ReduceContext(sizes=sizes, keys=keys, num_prefix=p))
        assert out.tokens.shape[1] == 4 and torch.equal(out.sizes.sum(1), sizes.sum(1))


@pytest.mark.parametrize("n, k", [(15, 8), (16, 8), (9, 5)])
def test_tome_sizes_sum_to_the_input(n, k):
    x, sizes, keys, _ = problem(1, n=n)
    out = make_operator("tome")(x, k, ReduceContext(sizes=sizes, keys=keys, num_prefix=1))
    assert torch.equal(out.sizes.sum(1), sizes.sum(1))


def test_tome_with_r_zero_is_the_identity():
    x, sizes, keys, _ = problem(2, n=12)
    out = make_operator("tome")(x, 12, ReduceContext(sizes=sizes, keys=keys, track=True))
    assert torch.equal(out.tokens, x) and torch.equal(out.sizes, sizes)
    assert torch.equal(out.assignment, torch.arange(12).expand(3, 12))


def test_tome_merging_identical_tokens_changes_nothing():
    x = torch.ones(2, 10, 4) * torch.arange(4.0)
    keys = torch.randn(2, 10, 3)
    out = make_operator("tome")(x, 6, ReduceContext(sizes=torch.ones(2, 10), keys=keys, num_prefix=1))
    assert torch.allclose(out.tokens, torch.ones(2, 6, 4) * torch.arange(4.0))


def test_tome_planned_counts_are_honest(images):
    model = tiny_vit()
    patch(model, "tome", keep=0.25, layers=(1, 2))
    with torch.no_grad():
        model(images)
    # targets 16 then 4: one matching can only halve the tokens, 64 -> 32 -> 16
    assert planned_counts(model)[1:3] == [(64, 32), (32, 16)]
    assert model.tpool_state.counts[2] == (32, 16)


def test_tome_defaults_to_proportional_attention():
    model = tiny_vit()
    assert patch(model, "tome", r=8).tpool_state.prop_attn is True
    assert patch(model, "tome", r=8, prop_attn=False).tpool_state.prop_attn is False
    assert patch(model, "topk", keep=0.5).tpool_state.prop_attn is False
    assert patch(model, "evit", keep=0.5).tpool_state.prop_attn is False


# ---------------------------------------------------------------- EViT


def ref_evit(x, sizes, attn, k, fuse="sum"):
    n = len(x)
    kept = sorted(sorted(range(n), key=lambda i: (-attn[i], i))[: k - 1])
    dropped = [i for i in range(n) if i not in kept]
    if fuse == "sum":
        fused = [sum(attn[i] * float(x[i][d]) for i in dropped) for d in range(len(x[0]))]
    else:
        fused = weighted_mean(x, [sizes[i] * attn[i] for i in range(n)], dropped)
    tokens = [list(map(float, x[i])) for i in kept] + [fused]
    out_sizes = [float(sizes[i]) for i in kept] + [sum(float(sizes[i]) for i in dropped)]
    assignment = [kept.index(i) if i in kept else k - 1 for i in range(n)]
    return assignment, tokens, out_sizes


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 2, 9, 14])
@pytest.mark.parametrize("fuse", ["sum", "mean"])
def test_evit_matches_the_loop_reference(seed, k, fuse):
    x, sizes, _, attn = problem(seed)
    out = make_operator("evit", fuse=fuse)(x, k, ReduceContext(sizes=sizes, cls_attn=attn, track=True))
    assert out.tokens.shape == (3, k, 6)
    for i in range(3):
        ref_a, ref_tokens, ref_sizes = ref_evit(x[i].tolist(), sizes[i].tolist(), attn[i].tolist(), k, fuse)
        assert out.assignment[i].tolist() == ref_a
        assert torch.allclose(out.tokens[i], torch.tensor(ref_tokens, dtype=torch.float32), atol=1e-5)
        assert out.sizes[i].tolist() == ref_sizes
        kept = out.assignment[i] < k - 1
        assert torch.equal(out.tokens[i, : k - 1], x[i][kept]), "kept tokens are passed through exactly"


def test_evit_fused_token_by_hand():
    """5 patch tokens, class attention 0.3, 0.05, 0.2, 0.1, 0.15 (0.2 on the class token itself):
    keep 2 -> tokens 0 and 2 kept, fused = 0.05 x1 + 0.1 x3 + 0.15 x4 (EViT: not renormalised)."""
    x = torch.tensor([[[1.0, 0.0], [2.0, 4.0], [3.0, 1.0], [4.0, -2.0], [8.0, 2.0]]])
    attn = torch.tensor([[0.3, 0.05, 0.2, 0.1, 0.15]])
    ctx = ReduceContext(sizes=torch.ones(1, 5), cls_attn=attn)
    out = make_operator("evit")(x, 3, ctx)
    assert torch.allclose(out.tokens[0], torch.tensor([[1.0, 0.0], [3.0, 1.0], [1.7, 0.3]]))
    assert out.sizes.tolist() == [[1.0, 1.0, 3.0]]
    mean = make_operator("evit", fuse="mean")(x, 3, ctx)  # tpool's normalised fusion: / 0.3
    assert torch.allclose(mean.tokens[0, 2], torch.tensor([1.7, 0.3]) / 0.3)


def _evit_model(depth=10, **kw):
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=32, depth=depth, num_heads=2, **kw)


@pytest.mark.parametrize("keep, counts", [(0.7, [139, 99, 71]), (0.5, [99, 51, 27])])
def test_evit_keep_rate_gives_evit_counts(keep, counts):
    """EViT keeps ceil(keep * n) of n patch tokens (a fused one included) and adds the fused one."""
    model = patch(_evit_model(), "evit", keep=keep, layers=(3, 6, 9))
    out = planned_counts(model, 196)
    assert [out[i][1] for i in (3, 6, 9)] == counts
    assert evit_tokens(196, keep) == counts[0]
    # the other operators keep tpool's compounded floor(196 * keep^k)
    topk = planned_counts(patch(_evit_model(), "topk", keep=keep, layers=(3, 6, 9)), 196)
    assert [topk[i][1] for i in (3, 6, 9)] == [int(196 * keep ** s + 1e-9) for s in (1, 2, 3)]


def test_evit_identity_when_nothing_to_drop():
    x, sizes, _, attn = problem(5)
    out = make_operator("evit")(x, 15, ReduceContext(sizes=sizes, cls_attn=attn, track=True))
    assert torch.equal(out.tokens, x) and torch.equal(out.assignment, torch.arange(15).expand(3, 15))


# ---------------------------------------------------------------- every operator: dtypes, batch sizes, prefix tokens


@pytest.mark.parametrize("op", [name for name in operator_names() if name != "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_every_operator_any_dtype_and_batch_keeps_prefix_tokens(op, dtype, batch):
    model = FAMILIES["deit_distilled"]().to(dtype)  # two prefix tokens (other families: test_patch.py)
    torch.manual_seed(2)
    images = torch.randn(batch, 3, 32, 32, dtype=dtype)
    patch(model, op, keep=0.5, layers=(1, 2), track=True)
    seen = []
    hook = model.blocks[1].reducer.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        logits = model(images)
    hook.remove()
    (x_in, x_out), = seen
    p = model.num_prefix_tokens
    assert x_out.dtype == dtype and logits.shape == (batch, 10) and torch.isfinite(logits.float()).all()
    assert torch.equal(x_in[:, :p], x_out[:, :p])
    assert model.tpool_state.sizes.dtype == torch.float32
    if model.blocks[1].reducer.operator.merges:
        assert torch.all(model.tpool_state.sizes.sum(1) == 64)


@pytest.mark.parametrize("op", [name for name in operator_names() if name != "none"])
def test_every_operator_compiles_as_one_graph(op):
    """No host sync or data-dependent Python branching in reduce: dynamo captures it whole (fullgraph)."""
    g = torch.Generator().manual_seed(0)
    x, sizes = torch.randn(2, 64, 16, generator=g), torch.randint(1, 3, (2, 64), generator=g).float()
    features = dict(significance=torch.rand(2, 64, generator=g), cls_attn=torch.rand(2, 64, generator=g), keys=torch.randn(2, 64, 8, generator=g))
    features["received"] = torch.rand(2, 64, generator=g)  # (ops-merge) MCTF reads the attention received (RECEIVED)
    operator = make_operator(op)

    def reduce(x, sizes, significance, cls_attn, keys, received):
        ctx = ReduceContext(sizes=sizes, grid=(8, 8), track=True, significance=significance, cls_attn=cls_attn, keys=keys, received=received)
        out = operator(x, 58 if op == "atc" else 20, ctx)  # atc unrolls one step per merge: few merges, fast capture
        return out.tokens, out.sizes, out.assignment

    torch._dynamo.reset()
    compiled = torch.compile(reduce, fullgraph=True, backend="eager")
    got = compiled(x, sizes, **features)
    if op != "random":  # random draws differ between calls
        for g_out, want in zip(got, reduce(x, sizes, **features)):
            assert torch.equal(g_out, want)


# ---------------------------------------------------------------- FLOPs: the operators' own cost is counted


def test_tome_and_evit_gmacs_match_their_formulas():
    import timm

    from tpool_cli.flops import count_flops

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()  # C = 192, keys D = 64
    c, d = 192, 64
    patch(model, "tome", keep=0.7)
    for layer in count_flops(model).layers:
        n = layer.tokens_in
        # unit keys (N·D), A x B similarity matmul, size-weighted pooling (N·C + N)
        expected = n * d + ((n + 1) // 2) * (n // 2) * d + n * c + n if layer.tokens_out < n else 0
        assert layer.operator == pytest.approx(expected * 1e-9, rel=1e-9, abs=1e-15)
    patch(model, "evit", keep=0.7)
    for layer in count_flops(model).layers:
        # the fused token: attention-weighted sum over N tokens, and the class-attention row it ranks by
        # ((N + 1) x C with the class token; computed only for the operator, so in its column: docs/flops.md)
        expected = layer.tokens_in * c + (layer.tokens_in + 1) * c if layer.tokens_out < layer.tokens_in else 0
        assert layer.operator == pytest.approx(expected * 1e-9, rel=1e-9, abs=1e-15)
