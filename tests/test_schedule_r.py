"""The r schedule (ToMe's "remove r tokens in every block"): Schedule(r=...), patch(r=...), --r."""

import json

import pytest
import torch

from conftest import FAMILIES, tiny_vit
from tpool_cli.cli import main
from tpool_cli.cli_options import parse_schedule_args
from tpool_cli.errors import TpoolError
from tpool_cli.evaluate import model_config
from tpool_cli.ops import operator_names
from tpool_cli.patch import capped_blocks, patch, planned_counts
from tpool_cli.schedule import Schedule, parse_r
from tpool_cli.sweep import plan_points, point_key


def test_r_every_block_or_one_per_block():
    assert Schedule(r=13).r == (13,) and Schedule(r=13).describe(12) == "r=13"
    assert Schedule(r=13).removals(4) == {0: 13, 1: 13, 2: 13, 3: 13}
    s = Schedule(r=(16, 16, 0, 8))
    assert s.removals(4) == {0: 16, 1: 16, 3: 8} and s.reduction_layers(4) == (0, 1, 3)
    assert s.describe(4) == "r=16,16,0,8" and s.targets(4, 64) == {}
    assert Schedule(r=0).is_identity and Schedule(r=(0, 0)).is_identity and not Schedule(r=1).is_identity


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=-1), "integers >= 0"),
        (dict(r=(4, -2)), "integers >= 0"),
        (dict(r=(1.5,)), "integers >= 0"),
        (dict(r=()), "integers >= 0"),
        (dict(r=8, keep=0.5), "exactly one of"),
        (dict(r=8, tokens=(10,)), "exactly one of"),
        (dict(r=8, layers=(1, 2)), "--layers goes with --keep or --tokens"),
    ],
)
def test_bad_r_is_one_clear_error(kwargs, message):
    with pytest.raises(TpoolError, match=message.replace("(", r"\(")):
        Schedule(**kwargs)


def test_r_list_length_must_be_the_depth():
    with pytest.raises(TpoolError, match="give one .every block. or one per block .4."):
        Schedule(r=(1, 2, 3)).validate(4, 64)
    with pytest.raises(TpoolError, match="--r has 3 values"):
        patch(tiny_vit(), "tome", r=(1, 2, 3))


def test_parse_r_sweeps_or_lists_per_block():
    assert parse_r("4,8,13,16", sweep=True) == [(4,), (8,), (13,), (16,)]  # pareto: four points
    assert parse_r("16,16,12", sweep=False) == [(16, 16, 12)]  # evaluate: one per-block list
    assert parse_r("16,16,12;8", sweep=True) == [(16, 16, 12), (8,)]
    assert parse_r("16,16,12;", sweep=True) == [(16, 16, 12)]
    assert parse_r(None, sweep=True) is None
    for bad, message in (("a", "comma-separated integers"), ("-3", ">= 0"), (";", "empty")):
        with pytest.raises(TpoolError, match=message):
            parse_r(bad, sweep=True)
    assert parse_schedule_args(None, None, None, r="8") == (None, None, None, [(8,)])
    with pytest.raises(TpoolError, match="not both --keep and --r"):
        parse_schedule_args("0.5", None, None, r="8")
    with pytest.raises(TpoolError, match="--layers goes with"):
        parse_schedule_args(None, "1,2", None, r="8")


@pytest.mark.parametrize("op", [name for name in operator_names() if name != "none"])
def test_r_zero_is_the_identity_bit_exact(op, images):
    model = tiny_vit()
    with torch.no_grad():
        plain = model(images)
        patched = patch(model, op, r=0)(images)
    assert torch.equal(plain, patched)
    assert planned_counts(model) == [(64, 64)] * 4


def test_r_removes_r_tokens_in_every_block(images):
    model = patch(tiny_vit(), "tome", r=8, track=True)
    with torch.no_grad():
        model(images)
    assert [model.tpool_state.counts[i] for i in range(4)] == [(64, 56), (56, 48), (48, 40), (40, 32)]
    assert torch.all(model.tpool_state.sizes.sum(1) == 64)
    model = patch(tiny_vit(), "topk", r=(10, 0, 5, 20))
    assert [k for _, k in planned_counts(model)] == [54, 54, 49, 29]


def test_r_on_a_distilled_model_protects_both_prefix_tokens(images):
    model = FAMILIES["deit_distilled"]()
    patch(model, "tome", r=8)
    seen = []
    hooks = [blk.reducer.register_forward_hook(lambda mod, args, out: seen.append((args[0], out))) for blk in model.blocks]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    assert len(seen) == 4 and model.num_prefix_tokens == 2
    for x_in, x_out in seen:
        assert torch.equal(x_in[:, :2], x_out[:, :2]) and x_out.shape[1] == x_in.shape[1] - 8


def test_r_above_the_cap_is_realised_capped_and_reported():
    model = patch(tiny_vit(), "tome", r=40)  # ToMe merges at most half per block: 64 -> 32 -> 16 -> 8 -> 4
    assert [k for _, k in planned_counts(model)] == [32, 16, 8, 4]
    assert capped_blocks(model) == [(0, 40, 32), (1, 40, 16), (2, 40, 8), (3, 40, 4)]
    assert capped_blocks(patch(tiny_vit(), "tome", r=8)) == []
    model = patch(tiny_vit(), "topk", r=40)  # any operator: at least one token stays
    assert [k for _, k in planned_counts(model)] == [24, 1, 1, 1] and capped_blocks(model)[0] == (1, 40, 23)


def test_r_points_have_their_own_result_keys():
    points = plan_points(["tome"], None, None, None, [(4,), (8,), (0,)])
    assert [p.label(4) for p in points] == ["baseline", "tome r=4", "tome r=8"]  # r=0 is the baseline
    rows = []
    for p in points[1:]:
        model = tiny_vit()
        p.apply(model)
        rows.append(model_config(model))
    assert [r["r"] for r in rows] == [[4], [8]] and all(r["prop_attn"] is True for r in rows)  # tome's default, resolved
    assert point_key(rows[0]) != point_key(rows[1])
    keep_row = model_config(patch(tiny_vit(), "topk", keep=0.5))
    assert "r" not in keep_row  # keep/tokens rows (and their keys) are as before


def test_cli_r_and_no_prop_attn(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--model", "deit_tiny_patch16_224", "--op", "tome", "--r", "13", "--no-prop-attn", "--format", "json"])
    assert exit_info.value.code in (0, None)
    out = json.loads(capsys.readouterr().out)
    row = out["results"][1]
    assert row["schedule"] == "r=13" and row["r"] == [13]
    assert [layer["tokens_out"] for layer in row["per_layer"]][:3] == [183, 170, 157]
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--model", "deit_tiny_patch16_224", "--op", "tome", "--r", "1,2;3,4"])
    assert exit_info.value.code == 2 and "one per block (12)" in capsys.readouterr().err
