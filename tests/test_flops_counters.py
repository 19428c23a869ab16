"""fvcore and torch's dispatcher-level counter agree per block column and in total (issue 19)."""

import pytest
import timm
import torch
from conftest import FAMILIES, tiny_vit

from tpool_cli.cli import main
from tpool_cli.errors import TpoolError
from tpool_cli.flops import AGREEMENT_TOLERANCE, compare_counters, count_flops
from tpool_cli.flops_torch import TORCH_FORMULAS
from tpool_cli.ops import operator_names
from tpool_cli.patch import patch

OPS = [op for op in operator_names() if op != "none"]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("op", ["none", *OPS])
def test_counters_agree_per_layer_and_in_total(family, op):
    model = FAMILIES[family]()
    if op != "none":
        patch(model, op, keep=0.7)
    agreement = compare_counters(model)
    assert agreement.max_rel_diff <= AGREEMENT_TOLERANCE, (agreement.where, agreement.max_rel_diff)
    fv, tc = agreement.reports
    assert fv.counter == "fvcore" and tc.counter == "torch"
    assert [(la.tokens_in, la.tokens_out) for la in fv.layers] == [(lb.tokens_in, lb.tokens_out) for lb in tc.layers]
    assert not any("scaled_dot_product" in name or "layer_norm" in name for name in tc.uncounted)


def test_counters_agree_with_explicit_attention_and_prop_attn():
    model = tiny_vit()
    for blk in model.blocks:
        blk.attn.fused_attn = False
    patch(model, "tome", keep=0.7, prop_attn=True)
    agreement = compare_counters(model)
    assert agreement.max_rel_diff <= AGREEMENT_TOLERANCE, agreement.where


def test_deit_s_both_counters_match_the_analytic_baseline():
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    for counter in ("fvcore", "torch"):
        report = count_flops(model, counter=counter)
        assert report.total == pytest.approx(4.608338304, abs=1e-12), counter  # 4.6083, docs/flops.md
        assert report.layers[0].attention == pytest.approx((4 * 197 * 384**2 + 2 * 197**2 * 384) * 1e-9, rel=1e-12)


def test_torch_counter_lists_what_it_does_not_count():
    report = count_flops(tiny_vit(), counter="torch")
    assert "aten.gelu" in report.uncounted and "aten.add" in report.uncounted
    assert "aten.view" not in report.uncounted  # views and allocations carry no arithmetic


def test_unknown_counter_is_one_clear_error():
    with pytest.raises(TpoolError, match="unknown FLOP counter"):
        count_flops(tiny_vit(), counter="ptflops")  # type: ignore[arg-type]


def _profile(capsys, *extra):
    argv = ["profile", "--model", "deit_tiny_patch16_224", "--img-size", "64", "--op", "topk", "--keep", "0.7", *extra]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr()


def test_profile_counter_both_agrees_and_exits_zero(capsys):
    code, out = _profile(capsys, "--counter", "both")
    assert code == 0, out.err
    assert "fvcore vs torch" in out.out and "torch GMACs" in out.out


def test_profile_counter_both_fails_on_a_disagreement(capsys, monkeypatch):
    # remove one formula: torch's counter no longer counts layer norms, so the "other" column differs
    monkeypatch.delitem(TORCH_FORMULAS, torch.ops.aten.native_layer_norm)
    code, out = _profile(capsys, "--counter", "both", "--format", "json")
    assert code == 1
    assert "counters disagree" in out.err and "other" in out.err


def test_profile_torch_counter_gives_the_same_json(capsys):
    import json

    code, fv = _profile(capsys, "--format", "json")
    assert code == 0
    code, tc = _profile(capsys, "--counter", "torch", "--format", "json")
    assert code == 0
    a, b = json.loads(fv.out)["results"], json.loads(tc.out)["results"]
    assert [r["counter"] for r in a + b] == ["fvcore"] * len(a) + ["torch"] * len(b)
    assert [r["per_layer"] for r in a] == [r["per_layer"] for r in b]


def test_profile_unknown_counter_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--counter", "ptflops"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unknown --counter 'ptflops'" in err and len(err.strip().splitlines()) == 1
