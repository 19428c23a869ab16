"""ToMe and EViT against loop references; every operator in fp32/bf16 at batch 1 and 3."""

import math

import pytest
import torch

from conftest import FAMILIES, tiny_vit
from tpool_cli.ops import make_operator, operator_names
from tpool_cli.ops.base import ReduceContext
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


def ref_tome(x, sizes, keys, r):
    """Bipartite soft matching on one image with Python loops (float64)."""
    n = len(x)
    unit = [[v / math.sqrt(sum(u * u for u in k)) for v in k] for k in keys]
    side_a, side_b = list(range(0, n, 2)), list(range(1, n, 2))
    best, partner = {}, {}
    for i in side_a:
        scores = [sum(p * q for p, q in zip(unit[i], unit[j])) for j in side_b]
        top = max(range(len(side_b)), key=lambda t: (scores[t], -t))
        best[i], partner[i] = scores[top], side_b[top]
    merged = set(sorted(side_a, key=lambda i: (-best[i], i))[:r])
    groups = [[i] for i in side_a if i not in merged] + [[j] + [i for i in side_a if i in merged and partner[i] == j] for j in side_b]
    assignment = [None] * n
    for g, members in enumerate(groups):
        for i in members:
            assignment[i] = g
    tokens = [weighted_mean(x, sizes, members) for members in groups]
    return assignment, tokens, [sum(float(sizes[i]) for i in members) for members in groups]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n, k", [(15, 10), (16, 9), (16, 8), (7, 5)])
def test_tome_matches_the_loop_reference(seed, n, k):
    x, sizes, keys, _ = problem(seed, n=n)
    out = make_operator("tome").reduce(x, k, ReduceContext(sizes=sizes, keys=keys, track=True))
    assert out.tokens.shape == (3, k, 6)
    for i in range(3):
        ref_a, ref_tokens, ref_sizes = ref_tome(x[i].tolist(), sizes[i].tolist(), keys[i].tolist(), n - k)
        assert out.assignment[i].tolist() == ref_a
        assert torch.allclose(out.tokens[i], torch.tensor(ref_tokens, dtype=torch.float32), atol=1e-5)
        assert out.sizes[i].tolist() == ref_sizes


@pytest.mark.parametrize("n, k", [(15, 8), (16, 8), (9, 5)])
def test_tome_sizes_sum_to_the_input(n, k):
    x, sizes, keys, _ = problem(1, n=n)
    out = make_operator("tome").reduce(x, k, ReduceContext(sizes=sizes, keys=keys))
    assert torch.equal(out.sizes.sum(1), sizes.sum(1))


def test_tome_with_r_zero_is_the_identity():
    x, sizes, keys, _ = problem(2, n=12)
    out = make_operator("tome").reduce(x, 12, ReduceContext(sizes=sizes, keys=keys, track=True))
    assert torch.equal(out.tokens, x) and torch.equal(out.sizes, sizes)
    assert torch.equal(out.assignment, torch.arange(12).expand(3, 12))


def test_tome_realises_at_most_half_the_tokens_per_block():
    op = make_operator("tome")
    assert max_merges(64) == 32 and max_merges(7) == 4 and max_merges(1) == 0
    assert op.realise(64, 40, None) == 40
    assert op.realise(64, 10, None) == 32  # r capped at |A| = 32
    assert op.realise(7, 1, None) == 3  # |A| = 4 of 7
    assert op.realise(2, 1, None) == 1 and op.realise(1, 1, None) == 1
    x, sizes, keys, _ = problem(3, n=7)
    assert make_operator("tome").reduce(x, 1, ReduceContext(sizes=sizes, keys=keys)).tokens.shape[1] == 3


def test_tome_planned_counts_are_honest(images):
    model = tiny_vit()
    patch(model, "tome", keep=0.25, layers=(1, 2))
    with torch.no_grad():
        model(images)
    # targets 16 then 4: one matching can only halve the tokens, 64 -> 32 -> 16
    assert planned_counts(model)[1:3] == [(64, 32), (32, 16)]
    assert model.tpool_state.counts[2] == (32, 16)


def test_tome_per_block_r_schedule(images):
    model = tiny_vit()
    patch(model, "tome", tokens=(56, 48, 40, 32), track=True)  # ToMe's r = 8 in every block
    with torch.no_grad():
        model(images)
    assert [model.tpool_state.counts[i] for i in range(4)] == [(64, 56), (56, 48), (48, 40), (40, 32)]
    assert torch.all(model.tpool_state.sizes.sum(1) == 64)


# ---------------------------------------------------------------- EViT


def ref_evit(x, sizes, attn, k):
    n = len(x)
    kept = sorted(sorted(range(n), key=lambda i: (-attn[i], i))[: k - 1])
    dropped = [i for i in range(n) if i not in kept]
    weights = [sizes[i] * attn[i] for i in range(n)]
    tokens = [list(map(float, x[i])) for i in kept] + [weighted_mean(x, weights, dropped)]
    out_sizes = [float(sizes[i]) for i in kept] + [sum(float(sizes[i]) for i in dropped)]
    assignment = [kept.index(i) if i in kept else k - 1 for i in range(n)]
    return assignment, tokens, out_sizes


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 2, 9, 14])
def test_evit_matches_the_loop_reference(seed, k):
    x, sizes, _, attn = problem(seed)
    out = make_operator("evit").reduce(x, k, ReduceContext(sizes=sizes, cls_attn=attn, track=True))
    assert out.tokens.shape == (3, k, 6)
    for i in range(3):
        ref_a, ref_tokens, ref_sizes = ref_evit(x[i].tolist(), sizes[i].tolist(), attn[i].tolist(), k)
        assert out.assignment[i].tolist() == ref_a
        assert torch.allclose(out.tokens[i], torch.tensor(ref_tokens, dtype=torch.float32), atol=1e-5)
        assert out.sizes[i].tolist() == ref_sizes
        kept = out.assignment[i] < k - 1
        assert torch.equal(out.tokens[i, : k - 1], x[i][kept]), "kept tokens are passed through exactly"


def test_evit_fused_token_is_defined_without_attention():
    x, sizes, _, _ = problem(4)
    attn = torch.zeros(3, 15)
    attn[:, :3] = 1.0
    out = make_operator("evit").reduce(x, 4, ReduceContext(sizes=sizes, cls_attn=attn))
    expected = (x[:, 3:] * sizes[:, 3:, None]).sum(1) / sizes[:, 3:].sum(1, keepdim=True)
    assert torch.allclose(out.tokens[:, -1], expected, atol=1e-5)


def test_evit_identity_when_nothing_to_drop():
    x, sizes, _, attn = problem(5)
    out = make_operator("evit").reduce(x, 15, ReduceContext(sizes=sizes, cls_attn=attn, track=True))
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
    operator = make_operator(op)

    def reduce(x, sizes, significance, cls_attn, keys):
        ctx = ReduceContext(sizes=sizes, grid=(8, 8), track=True, significance=significance, cls_attn=cls_attn, keys=keys)
        out = operator.reduce(x, 20, ctx)
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
