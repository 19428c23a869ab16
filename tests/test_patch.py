"""The patch mechanism, for every registered operator and every supported model family."""

import pytest
import torch

from conftest import FAMILIES, tiny_vit
from tpool_cli.errors import TpoolError
from tpool_cli.ops import operator_names
from tpool_cli.patch import is_patched, patch, planned_counts, unpatch

OPS = operator_names()
REDUCING = [op for op in OPS if op != "none"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("op", OPS)
def test_keep_one_is_bit_identical(family, op, images):
    model = FAMILIES[family]()
    with torch.no_grad():
        ref = model(images)
        patch(model, op, keep=1.0, layers=(1, 2))
        assert torch.equal(model(images), ref)
        unpatch(model)
        assert not is_patched(model)
        assert torch.equal(model(images), ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("op", REDUCING)
def test_token_counts_follow_the_schedule(family, op, images):
    model = FAMILIES[family]()
    patch(model, op, keep=0.5, layers=(1, 2))
    with torch.no_grad():
        out = model(images)
    assert out.shape == (3, 10)
    counts = model.tpool_state.counts
    assert [counts[i] for i in range(4)] == planned_counts(model)
    if op == "grid":  # realised as a 5x6 then a 4x4 grid: the largest grids within the budgets 32 and 16
        assert counts[1] == (64, 30) and counts[2] == (30, 16)
    elif op == "evit":  # EViT's own arithmetic: ceil(0.5 * n) kept + the fused token
        assert counts[1] == (64, 33) and counts[2] == (33, 18)
    else:
        assert counts[1] == (64, 32) and counts[2] == (32, 16)
    assert counts[0] == (64, 64) and counts[3] == (counts[2][1],) * 2


@pytest.mark.parametrize("op", REDUCING)
def test_every_operator_runs_under_bf16_autocast(op, images):
    """CUDA evaluation runs under bf16 autocast by default; emulated here on the CPU: the patched model
    runs, keeps the schedule and gives finite logits (an out= buffer of the wrong dtype once broke atc)."""
    model = tiny_vit()
    patch(model, op, keep=0.5, layers=(1, 2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    assert [model.tpool_state.counts[i] for i in range(4)] == planned_counts(model)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("op", REDUCING)
def test_prefix_tokens_pass_through_untouched(family, op, images):
    model = FAMILIES[family]()
    patch(model, op, keep=0.5, layers=(1, 2))
    seen = []
    hook = model.blocks[1].reducer.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        model(images)
    hook.remove()
    (x_in, x_out), = seen
    p = model.num_prefix_tokens
    assert torch.equal(x_in[:, :p], x_out[:, :p])
    assert x_out.shape[1] == p + {"grid": 30, "evit": 33}.get(op, 32)


@pytest.mark.parametrize("op", REDUCING)
def test_sizes_and_source_map(op, images):
    model = tiny_vit()
    patch(model, op, keep=0.5, layers=(1, 2), track=True)
    with torch.no_grad():
        model(images)
    st = model.tpool_state
    n = st.counts[3][1]
    assert st.sizes.shape == (3, n)
    # the source map partitions the original patches among current tokens (or marks them dropped)
    for b in range(3):
        src = st.source[b]
        kept = src[src >= 0]
        assert kept.max() < n
        counted = torch.bincount(kept, minlength=n).float()
        assert torch.equal(counted, st.sizes[b]), "sizes must count the original patches each token stands for"
    if model.blocks[1].reducer.operator.merges:
        assert torch.all(st.sizes.sum(1) == 64)
        assert torch.all(st.source >= 0)


def test_prop_attn_changes_only_reduced_models(images):
    model = tiny_vit()
    with torch.no_grad():
        patch(model, "grid", keep=0.5, layers=(1,))
        plain = model(images)
        patch(model, "grid", keep=0.5, layers=(1,), prop_attn=True)
        prop = model(images)
        patch(model, "grid", keep=1.0, prop_attn=True)
        same = model(images)
        unpatch(model)
        assert torch.equal(same, model(images))
    assert not torch.allclose(plain, prop)


def test_random_is_seeded(images):
    outs = []
    for seed in (0, 0, 1):
        model = tiny_vit()
        patch(model, "random", keep=0.5, layers=(1,), seed=seed)
        with torch.no_grad():
            outs.append(model(images))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_repatching_replaces_the_operator(images):
    model = tiny_vit()
    patch(model, "topk", keep=0.5)
    patch(model, "random", keep=0.5, layers=(1,))
    assert all(type(b).__name__ == "ReducingBlock" and type(b.block).__name__ == "Block" for b in model.blocks)
    assert model.blocks[1].reducer.operator.name == "random"


def test_unsupported_model_is_a_clear_error():
    with pytest.raises(TpoolError, match="not a timm VisionTransformer"):
        patch(torch.nn.Linear(2, 2), "topk", keep=0.5)


def test_bad_operator_option():
    with pytest.raises(TpoolError, match="score must be one of"):
        patch(tiny_vit(), "topk", keep=0.5, score="bogus")


def test_class_attention_operators_need_a_class_token(images):
    model = tiny_vit(class_token=False, global_pool="avg")
    for op in ("topk", "evit"):
        with pytest.raises(TpoolError, match="no class token"):
            patch(model, op, keep=0.5)
    patch(model, "kmeans", keep=0.5, layers=(1,))  # significance-based operators work without one
    with torch.no_grad():
        assert model(images).shape == (3, 10)
    assert model.tpool_state.counts[1] == (64, 32)


def test_patch_config_and_loose_arguments_agree(images):
    """patch(config=PatchConfig(...)) and the old loose keywords build the same patch; loose ones override."""
    from dataclasses import dataclass

    from tpool_cli.ops.pruning import TopK
    from tpool_cli.patch_config import PatchConfig

    model = tiny_vit()
    with torch.no_grad():
        patch(model, "kmeans", keep=0.5, layers=(1, 2), config=PatchConfig(prop_attn=True, seed=3, track=True))
        a = model(images)
        assert model.tpool_config == PatchConfig(prop_attn=True, seed=3, track=True) and model.tpool_state.source is not None
        patch(model, "kmeans", keep=0.5, layers=(1, 2), prop_attn=True, seed=3, track=True)
        assert torch.equal(model(images), a)
        patch(model, "kmeans", keep=0.5, layers=(1, 2), config=PatchConfig(prop_attn=True), prop_attn=False)
        assert model.tpool_config.prop_attn is False and not model.tpool_state.prop_attn

    @dataclass(frozen=True)
    class PropByDefault(TopK):
        default_prop_attn = True

    patch(model, PropByDefault(), keep=0.5, layers=(1,))
    assert model.tpool_state.prop_attn  # prop_attn left open: the operator's default
    patch(model, "topk", keep=0.5, layers=(1,))
    assert not model.tpool_state.prop_attn  # today's operators: off, as before
    unpatch(model)
    assert not hasattr(model, "tpool_config")
