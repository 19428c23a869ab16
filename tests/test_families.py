"""Every supported timm ViT family through the one mechanism (tiny random-init configs, CPU).

Class-token ViT, average-pooling ViT, attention-pooling (map) ViT, registers, DeiT-III
LayerScale, and timm's ``Eva`` class: EVA-02 (SwiGLU, q/v bias, rope), rope ViTs (axial and
mixed rope, with absolute position embeddings too), DINOv3 (registers, rope). Swin, Hiera and
NaFlex ViTs are refused by name.
"""

from __future__ import annotations

import pytest
import timm
import torch

from tpool_cli.errors import TpoolError
from tpool_cli.ops import make_operator, operator_names
from tpool_cli.ops.base import ReduceContext, Reduction
from tpool_cli.patch import ReductionState, follow_positions, patch, planned_counts, unpatch

SMALL = dict(img_size=32, patch_size=4, depth=3, num_classes=10, embed_dim=64, num_heads=2)


def _model(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **{**SMALL, **overrides}).eval()


FAMILIES = {
    "vit_cls": lambda: _model("vit_tiny_patch16_224"),
    "vit_avg": lambda: _model("vit_medium_patch16_gap_256"),
    "vit_map": lambda: _model("vit_base_patch16_siglip_224"),
    "registers": lambda: _model("vit_tiny_patch16_224", reg_tokens=4),
    "deit3": lambda: _model("deit3_small_patch16_224", init_values=0.3),
    "eva02": lambda: _model("eva02_tiny_patch14_224"),
    "rope_axial_ape": lambda: _model("vit_small_patch16_rope_ape_224"),
    "rope_mixed": lambda: _model("vit_small_patch16_rope_mixed_224"),
    "rope_reg_gap": lambda: _model("vit_medium_patch16_rope_reg1_gap_256"),
    "dinov3": lambda: _model("vit_small_patch16_dinov3"),
}


def _ops_for(model: torch.nn.Module) -> list[str]:
    cls_ops = {"topk", "evit"}
    return [op for op in operator_names() if getattr(model, "cls_token", None) is not None or op not in cls_ops]


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_keep_one_identical_and_every_operator_runs(family, images):
    model = FAMILIES[family]()
    with torch.no_grad():
        ref = model(images)
        for op in _ops_for(model):
            patch(model, op, keep=1.0, layers=(1,))
            assert torch.equal(model(images), ref), op
            patch(model, op, keep=0.7, layers=(1, 2))
            out = model(images)
            assert torch.isfinite(out).all(), op
            counts = model.tpool_state.counts
            assert [counts[i] for i in range(3)] == planned_counts(model), op
            unpatch(model)
        assert torch.equal(model(images), ref)


def _duplicated_pairs(images: torch.Tensor) -> torch.Tensor:
    """Images whose patch columns come in identical pairs (columns 2j and 2j+1 of the 8 x 8 grid)."""
    out = images.clone()
    for j in range(0, 8, 2):
        out[..., 4 * (j + 1) : 4 * (j + 2)] = out[..., 4 * j : 4 * (j + 1)]
    return out


@pytest.mark.parametrize("family", ["vit_cls", "vit_avg", "vit_map"])
def test_merging_duplicate_patches_leaves_the_logits_unchanged(family, images):
    """Zero position embeddings + identical patch pairs: ToMe in block 0 merges 16 of the 32 pairs (all pairs tie
    at cosine 1), so sizes are 2 and 1 mixed; with proportional attention and a size-aware head, nothing
    downstream can tell (the issue's exactness case; merging all pairs would weight every token alike)."""
    model = FAMILIES[family]()
    with torch.no_grad():
        model.pos_embed.zero_()
        x = _duplicated_pairs(images)
        ref = model(x)
        patch(model, "tome", keep=0.75, layers=(0,), prop_attn=True, track=True)
        out = model(x)
    st = model.tpool_state
    assert st.counts[0] == (64, 48) and torch.all((st.sizes == 2).sum(1) == 16)
    merged = st.source[:, 0::2] == st.source[:, 1::2]
    assert torch.all(merged.sum(1) == 16), "ToMe must merge duplicated pairs only"
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel < 1e-5, f"logits moved by {rel:.2e} relative"


def test_size_weighted_avg_pool_is_the_mean_over_original_patches():
    from tpool_cli.adapters.heads import sized_global_pool

    x = torch.randn(2, 1 + 3, 4)
    sizes = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    got = sized_global_pool(x, sizes, "avg", 1, False)
    want = torch.stack([(x[0, 1] + 2 * x[0, 2] + 3 * x[0, 3]) / 6, x[1, 1:].mean(0)])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("family", ["eva02", "rope_mixed", "dinov3"])
@pytest.mark.parametrize("op", ["random", "kmedoids"])
def test_rope_follows_the_kept_tokens(family, op, images):
    """After a pruning (or K-Medoids) each token's rope is its own original patch's: the next block equals
    timm's own EvaBlock run on the reduced tokens with the rope rows gathered at those patches."""
    from tpool_cli.adapters.rope import gather_rope

    model = FAMILIES[family]()
    patch(model, op, keep=0.5, layers=(0,), track=True)
    st = model.tpool_state
    seen = {}
    model.blocks[1].register_forward_pre_hook(lambda mod, args, kwargs: seen.update(x=args[0], rope=kwargs["rope"]), with_kwargs=True)
    with torch.no_grad():
        model.forward_features(images)
        got = model.blocks[1](seen["x"], rope=seen["rope"])
        want = model.blocks[1].block(seen["x"], rope=gather_rope(seen["rope"], st.rope_index))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if op == "random":  # a pruned token keeps its own position: the patch it came from
        b, j = torch.nonzero(st.source >= 0, as_tuple=True)
        assert torch.equal(st.rope_index[b, st.source[b, j]], j)
        rows, cols = st.positions[b, st.source[b, j]].unbind(-1)
        assert torch.equal(rows * 8 + cols, j.float())


def test_rope_positions_of_a_merge():
    """Two identical tokens at patches p=3 and q=10 merged: K-Means (no representative) gives the size-weighted
    mean position and, with position="nearest", the rope of the member nearest to it (ties: the lower
    index); K-Medoids its medoid's. (The rope at the mean itself: tests/test_rope.py.)"""
    positions = torch.tensor([[[0.0, 3.0], [1.0, 2.0], [0.0, 1.0]]])  # three tokens, sizes 1, 3, 1
    index = torch.tensor([[3, 10, 1]])
    sizes = torch.tensor([[1.0, 3.0, 1.0]])
    assignment = torch.tensor([[0, 0, 1]])
    mean_out = Reduction(torch.zeros(1, 2, 4), torch.tensor([[4.0, 1.0]]), assignment)
    pos, rope = follow_positions(positions, index, sizes, mean_out, 2, "nearest")
    torch.testing.assert_close(pos, torch.tensor([[[0.75, 2.25], [0.0, 1.0]]]))
    assert rope.tolist() == [[10, 1]]  # (1, 2) is nearer to (0.75, 2.25) than (0, 3)
    equal = torch.ones(1, 3)
    pos, rope = follow_positions(positions[:, [0, 0, 2]] * 0 + positions[:, :1], index, equal, mean_out, 2, "nearest")
    assert rope.tolist() == [[3, 1]]  # a tie goes to the lower index
    medoid_out = Reduction(torch.zeros(1, 2, 4), torch.tensor([[4.0, 1.0]]), assignment, representative=torch.tensor([[1, 2]]))
    pos, rope = follow_positions(positions, index, sizes, medoid_out, 2, "representative")
    assert rope.tolist() == [[10, 1]] and torch.equal(pos, positions[:, 1:])


@pytest.mark.parametrize("num_prefix", [0, 1, 2])
def test_tome_rope_position_is_the_destination(num_prefix):
    """ToMe merges two identical tokens at patches p and q (one in A, one in B): the merged token takes
    the destination's (B side) position and rope, not the size-weighted mean; every other output is
    its own input token. Holds for either split parity."""
    torch.manual_seed(0)
    n, first = 12, num_prefix % 2
    p, q = (3, 10) if first else (2, 9)  # A = patches at sequence positions of even parity, B the others
    keys = torch.randn(1, n, 16)
    keys[0, p] = keys[0, q]
    sizes = torch.ones(1, n)
    sizes[0, p] = 3.0  # the mean would lean towards the source
    out = make_operator("tome").reduce(torch.randn(1, n, 8), n - 1, ReduceContext(sizes=sizes, keys=keys, num_prefix=num_prefix))
    merged = out.assignment[0, q]
    assert out.assignment[0, p] == merged and out.representative[0, merged] == q
    assert torch.equal(out.assignment.gather(1, out.representative), torch.arange(n - 1).unsqueeze(0))
    i = torch.arange(n)
    positions = torch.stack([i // 4, i % 4], dim=-1).float().unsqueeze(0)
    pos, rope = follow_positions(positions, i.unsqueeze(0) + 100, sizes, out, n - 1, "representative")
    assert torch.equal(pos[0, merged], positions[0, q]) and rope[0, merged] == 100 + q
    assert torch.equal(pos[0], positions[0, out.representative[0]])


def test_rope_state_only_for_rope_families(images):
    model = FAMILIES["vit_cls"]()
    patch(model, "kmeans", keep=0.5, layers=(1,))
    with torch.no_grad():
        model(images)
    assert not model.tpool_state.uses_rope and model.tpool_state.positions is None
    assert isinstance(model.tpool_state, ReductionState)


@pytest.mark.parametrize(
    "name,family", [("swin_tiny_patch4_window7_224", "SwinTransformer"), ("hiera_tiny_224", "Hiera"), ("naflexvit_base_patch16_gap", "NaFlexVit")]
)
def test_unsupported_families_are_named(name, family):
    kwargs = dict(depth=1) if family == "NaFlexVit" else {}
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(TpoolError, match=f"{family} is not supported"):
        patch(model, "topk", keep=0.5)


def test_operator_template_owns_the_identity():
    x = torch.randn(2, 5, 3)
    from tpool_cli.ops.base import ReduceContext

    for op in operator_names():
        out = make_operator(op)(x, 5, ReduceContext(sizes=torch.ones(2, 5), grid=(1, 5)))
        assert torch.equal(out.tokens, x) and torch.equal(out.assignment, torch.arange(5).expand(2, 5)), op


@pytest.mark.parametrize("family", ["eva02", "rope_mixed", "dinov3"])
@pytest.mark.parametrize("op", ["random", "grid"])
def test_eva_reducing_block_equals_timm_parts(family, op, images):
    """The reducing EvaBlock equals timm's own attention (q/v bias, rope), gamma_1, the operator, norm2,
    SwiGLU/MLP and gamma_2 composed by hand (random LayerScale gammas, so a dropped one shows)."""
    model = FAMILIES[family]()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for blk in model.blocks:
            for name in ("gamma_1", "gamma_2"):
                if getattr(blk, name) is None:
                    setattr(blk, name, torch.nn.Parameter(torch.ones(64)))
                getattr(blk, name).copy_(torch.rand(64, generator=g) * 2 - 0.5)
    patch(model, op, keep=0.5, layers=(0,))
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda mod, args, kwargs: seen.update(x=args[0], rope=kwargs["rope"]), with_kwargs=True)
    with torch.no_grad():
        model.forward_features(images)
        x, rope = seen["x"], seen["rope"]
        got = model.blocks[0](x, rope=rope)
        blk, p = model.blocks[0].block, model.num_prefix_tokens
        x1 = x + blk.gamma_1 * blk.attn(blk.norm1(x), rope=rope)
        from tpool_cli.ops.base import ReduceContext

        red = make_operator(op)(x1[:, p:], 32, ReduceContext(sizes=torch.ones(2, 64), grid=(8, 8), seed=model.tpool_state.block_seed(0)))
        x2 = torch.cat([x1[:, :p], red.tokens], dim=1)
        want = x2 + blk.gamma_2 * blk.mlp(blk.norm2(x2))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "family,op,schedule,options",
    [
        ("eva02", "kmeans", dict(keep=0.5, layers=(1,)), dict(iters=2)),  # size-aware avg head, rope at mean positions
        ("rope_mixed", "kmeans", dict(keep=0.5, layers=(0,)), {}),  # per-block rope tables evaluated between patches
        ("eva02", "mctf", dict(keep=0.7, layers=(1, 2)), {}),  # one-step-ahead: reduce before attention, pooled weights
    ],
)
def test_eva_compiles_in_one_graph(images, family, op, schedule, options):
    """torch.compile(fullgraph=True) through the Eva adapter and its rope side tensors equals eager."""
    import torch._dynamo

    model = FAMILIES[family]()
    patch(model, op, **schedule, **options)
    with torch.no_grad():
        eager = model(images)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)(images)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
