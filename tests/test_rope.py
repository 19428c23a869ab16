"""Rope between patches: a merged token's rotary embedding at its (fractional) mean position.

The reference for the embedding at a fractional position is timm's own code evaluated there
(the grid offset of ``RotaryEmbeddingCat`` shifted by half a patch, ``get_mixed_freqs`` and
DINOv3's ``_get_pos_embed_from_coords`` at shifted coordinates), never tpool's reading of the table.
"""

from __future__ import annotations

import copy
import logging

import pytest
import timm
import torch
from timm.layers.pos_embed_sincos import _build_grid, get_mixed_freqs, get_mixed_grid

from tpool_cli.adapters.rope import affine_rope_problem, rope_at_positions
from tpool_cli.ops import make_operator
from tpool_cli.ops.base import Reduction
from tpool_cli.patch import follow_positions, patch

SMALL = dict(img_size=32, patch_size=4, depth=3, num_classes=10, embed_dim=64, num_heads=2)
GRID = (8, 8)
ROPE_MODELS = {
    "eva02": "eva02_tiny_patch14_224",  # cat rope, ref_feat_shape scaling
    "rope_axial_ape": "vit_small_patch16_rope_ape_224",  # cat rope, xy indexing, absolute pos embed too
    "rope_mixed": "vit_small_patch16_rope_mixed_224",  # learned per-head frequencies, one table per block
    "rope_reg_gap": "vit_medium_patch16_rope_reg1_gap_256",
    "dinov3": "vit_small_patch16_dinov3",  # centred, normalised coordinates
}


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(ROPE_MODELS[family], pretrained=False, **SMALL).eval()


def _table(model: torch.nn.Module) -> torch.Tensor:
    """The full-grid rope table the model hands its blocks (as ``Eva.forward_features`` builds it)."""
    rope = model.rope
    return rope.get_embed() if getattr(rope, "feat_shape", None) is not None else rope.get_embed(shape=list(GRID))


def _grid_positions() -> torch.Tensor:
    i = torch.arange(GRID[0] * GRID[1])
    return torch.stack([i // GRID[1], i % GRID[1]], dim=-1).float().unsqueeze(0)  # 1 x N x 2 (row, col)


def _timm_rope_shifted(model: torch.nn.Module, dr: float, dc: float) -> torch.Tensor:
    """timm's rope table of every patch moved by (dr, dc) patches, computed by timm's own functions."""
    rope = model.rope
    name = type(rope).__name__
    if name == "RotaryEmbeddingCat":
        assert dr == dc, "the grid offset shifts both axes"
        shifted = copy.deepcopy(rope)
        shifted.grid_offset = rope.grid_offset + dr
        sin, cos = shifted._build_embed(list(GRID), shifted.bands)
        return torch.cat([sin, cos], dim=-1)
    if name == "RotaryEmbeddingMixed":
        t_x, t_y = get_mixed_grid(list(GRID), grid_indexing=rope.grid_indexing)
        first, second = (dr, dc) if rope.grid_indexing == "ij" else (dc, dr)
        return get_mixed_freqs(rope.freqs, t_x + first, t_y + second)
    assert name == "RotaryEmbeddingDinoV3" and rope.normalize_coords == "separate"
    coords = _build_grid(list(GRID), grid_type="centered", grid_offset=rope.grid_offset, grid_indexing=rope.grid_indexing,
                         normalize_coords="separate", ndim=2).flatten(0, -2)
    first, second = (dr, dc) if rope.grid_indexing == "ij" else (dc, dr)
    coords = coords + 2.0 * torch.tensor([first / GRID[0], second / GRID[1]])  # centred coordinates: 2 / size per patch
    sin, cos = rope._get_pos_embed_from_coords(coords)
    return torch.cat([sin, cos], dim=-1)


def _reading(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """tpool's rope at ``positions`` read from a full-grid table (any leading dims), as the table's shape."""
    lead = table.shape[:-2]
    flat = table.reshape(-1, *table.shape[-2:])
    return torch.stack([rope_at_positions(t, positions, GRID)[0, 0] for t in flat]).reshape(*lead, *table.shape[-2:])


@pytest.mark.parametrize("family", ROPE_MODELS)
def test_rope_at_the_patches_is_the_table(family):
    model = _model(family)
    assert affine_rope_problem(model, GRID) is None
    with torch.no_grad():
        table = _table(model)
    torch.testing.assert_close(_reading(table, _grid_positions()), table, atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", ROPE_MODELS)
def test_rope_between_patches_is_timms_rope_there(family):
    model = _model(family)
    shifts = [(0.5, 0.5)] if type(model.rope).__name__ == "RotaryEmbeddingCat" else [(0.5, 0.5), (0.25, 0.75), (-0.3, 0.6)]
    with torch.no_grad():
        table = _table(model)
        for dr, dc in shifts:
            want = _timm_rope_shifted(model, dr, dc)
            got = _reading(table, _grid_positions() + torch.tensor([dr, dc]))
            torch.testing.assert_close(got, want.to(got.dtype), atol=5e-5, rtol=0)


@pytest.mark.parametrize("family", ["eva02", "rope_mixed", "dinov3"])
def test_a_merge_rotates_at_the_mean_position(family):
    """K-Means in block 0: block 1 equals timm's own EvaBlock run on the merged tokens with the rope
    evaluated at their size-weighted mean positions (each position the mean of its members' patches)."""
    model = _model(family)
    patch(model, "kmeans", keep=0.5, layers=(0,), track=True)
    st = model.tpool_state
    seen = {}
    model.blocks[1].register_forward_pre_hook(lambda mod, args, kwargs: seen.update(x=args[0], rope=kwargs["rope"]), with_kwargs=True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.forward_features(images)
        got = model.blocks[1](seen["x"], rope=seen["rope"])
        want = model.blocks[1].block(seen["x"], rope=rope_at_positions(seen["rope"], st.positions, GRID))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert st.fractional and st.rope_index is None
    # each position is the mean of its members' patch coordinates (sizes 1 before the first merge)
    patches = _grid_positions()[0]
    for b in range(2):
        for t in range(st.positions.shape[1]):
            members = (st.source[b] == t).nonzero().flatten()
            torch.testing.assert_close(st.positions[b, t], patches[members].mean(0))


def test_two_identical_tokens_merged_sit_half_way():
    """Tokens at patches (0, 0) and (1, 1) merged (equal sizes): the merged token's position is (0.5, 0.5)
    for every operator whose merged position is the mean, and its rope is timm's rope there."""
    model = _model("eva02")
    positions = _grid_positions()[:, [0, 9, 2]]
    out = Reduction(torch.zeros(1, 2, 4), torch.tensor([[2.0, 1.0]]), torch.tensor([[0, 0, 1]]))
    pos, index = follow_positions(positions, torch.tensor([[0, 9, 2]]), torch.ones(1, 3), out, 2, "mean")
    assert index is None and pos[0].tolist() == [[0.5, 0.5], [0.0, 2.0]]
    with torch.no_grad():
        got = rope_at_positions(_table(model), pos, GRID)[0, 0, 0]
        want = _timm_rope_shifted(model, 0.5, 0.5)[0]  # patch (0, 0) moved by half a patch on both axes
    torch.testing.assert_close(got, want, atol=5e-5, rtol=0)


def test_position_nearest_restores_the_member_rope():
    model = _model("eva02")
    patch(model, "kmeans", keep=0.5, layers=(0,), position="nearest")
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    st = model.tpool_state
    assert not st.fractional and st.rope_index is not None and st.rope_index.shape == st.positions.shape[:2]


def test_tome_position_option():
    """ToMe's merged token keeps its destination's position by default; position="mean" takes the pair's mean."""
    model = _model("eva02")
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        patch(model, "tome", r=8)
        model(images)
        assert not model.tpool_state.fractional and model.tpool_state.rope_index is not None
        patch(model, "tome", r=8, position="mean")
        model(images)
        assert model.tpool_state.fractional
    assert make_operator("tome", position="mean").options() == {"position": "mean"}
    assert make_operator("tome").options() == {}  # the default stays out of result keys


class _Records(logging.Handler):
    """Collects records of one logger, whatever other tests did to propagation and levels."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_rope_that_is_not_affine_falls_back_to_the_nearest_member():
    model = _model("dinov3")
    rows, cols = _grid_positions()[0].unbind(-1)
    angle = (0.05 * (rows**2 + cols**2)).unsqueeze(-1).expand(-1, 32)  # small steps, but quadratic in the position
    curved = torch.cat([angle.sin(), angle.cos()], dim=-1)
    model.rope.get_embed = lambda shape=None, dtype=None: curved
    assert "not affine" in affine_rope_problem(model, GRID)
    fast = torch.cat([(3.0 * cols).unsqueeze(-1).expand(-1, 32).sin(), (3.0 * cols).unsqueeze(-1).expand(-1, 32).cos()], -1)
    model.rope.get_embed = lambda shape=None, dtype=None: fast  # 3 rad per patch: could be 3 - 2 pi
    assert "nearly pi" in affine_rope_problem(model, GRID)
    model.rope.get_embed = lambda shape=None, dtype=None: curved
    logger, records = logging.getLogger("tpool_cli.patch"), _Records()
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(records)
    try:
        patch(model, "kmeans", keep=0.5, layers=(0,))
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert any("nearest member" in m for m in records.messages) and not model.tpool_state.rope_between
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert not model.tpool_state.fractional


@pytest.mark.parametrize("family", ["eva02", "dinov3"])
def test_a_bf16_table_reads_to_its_own_rounding(family):
    """The steps are refined at the far end of each axis, so a bf16 table's rounding is not multiplied
    by the distance from the origin: the reading stays within twice the table's own rounding."""
    model = _model(family)
    with torch.no_grad():
        table = _table(model).float()
    positions = (_grid_positions() + 0.5).clamp(max=GRID[0] - 1)
    exact = rope_at_positions(table, positions, GRID).float()
    rounded = rope_at_positions(table.bfloat16(), positions, GRID).float()
    rounding = (table.bfloat16().float() - table).abs().max()
    assert (rounded - exact).abs().max() <= 2 * rounding + 1e-6


def test_a_rope_too_fast_for_its_grid_falls_back():
    """EVA-02's rope is scaled to its ref_feat_shape (16 x 16): on a 4 x 4 grid a channel turns by 4 rad
    per patch, which the table alone would read as 4 - 2 pi; the module's own bands say so."""
    from tpool_cli.adapters.rope import rope_step_bound

    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, **{**SMALL, "patch_size": 8}).eval()
    assert rope_step_bound(model.rope, (4, 4)) == pytest.approx(4.0)
    assert "nearly pi" in affine_rope_problem(model, (4, 4))
    patch(model, "kmeans", keep=0.5, layers=(0,))
    assert not model.tpool_state.rope_between
    assert affine_rope_problem(_model("eva02"), GRID) is None and rope_step_bound(_model("eva02").rope, GRID) == pytest.approx(2.0)


def test_rope_results_key_on_the_position():
    """The default position of a mean merge changed for rope models: their result rows name it, so a
    result stored before is not taken for the new reading; other models' keys are unchanged."""
    from tpool_cli.evaluate import model_config

    rope_model = patch(_model("eva02"), "kmeans", keep=0.5, layers=(0,))
    assert model_config(rope_model)["op_options"]["position"] == "mean"
    torch.manual_seed(0)
    plain = patch(timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL).eval(), "kmeans", keep=0.5)
    assert "position" not in model_config(plain)["op_options"]
