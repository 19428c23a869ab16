"""FLOP counts agree with the literature and with an analytic formula of the token schedule."""

import pytest
import timm

from tpool_cli.flops import count_flops
from tpool_cli.patch import patch


def analytic_gmacs(counts, c=384, p=1, classes=1000, patch_macs=196 * 768, extra_per_reduction=0):
    """patch embed + per block (norms at 5 flops/element, qkv, QK^T, AV, proj, MLP) + final norm + head.

    counts: (patch tokens in, out) per block; prefix tokens ``p`` are added to both.
    """
    total = patch_macs * c
    for n_in, n_out in counts:
        a, b = n_in + p, n_out + p
        total += 5 * a * c + 4 * a * c * c + 2 * a * a * c  # norm1, qkv + proj, QK^T + AV
        total += 5 * b * c + 8 * b * c * c  # norm2, MLP (ratio 4)
        if n_out < n_in:
            total += extra_per_reduction(a) if callable(extra_per_reduction) else extra_per_reduction
    return (total + 5 * (counts[-1][1] + p) * c + c * classes) * 1e-9


@pytest.mark.parametrize(
    "name, expected, width",
    [("deit_tiny_patch16_224", 1.258, 192), ("deit_small_patch16_224", 4.608, 384), ("deit_base_patch16_224", 17.583, 768)],
)
def test_baselines_match_the_literature(name, expected, width):
    model = timm.create_model(name, pretrained=False).eval()
    report = count_flops(model)
    assert report.total == pytest.approx(expected, rel=1e-3)
    assert report.total == pytest.approx(analytic_gmacs([(196, 196)] * 12, c=width), rel=1e-9)
    assert sum(layer.operator for layer in report.layers) == 0


@pytest.fixture(scope="module")
def deit_small():
    return timm.create_model("deit_small_patch16_224", pretrained=False).eval()


def test_fused_attention_is_counted(deit_small):
    report = count_flops(deit_small)
    assert "aten::scaled_dot_product_attention" not in report.uncounted
    attention = report.layers[0].attention
    assert attention == pytest.approx((4 * 197 * 384**2 + 2 * 197**2 * 384) * 1e-9, rel=1e-9)


@pytest.mark.parametrize("keep", [0.9, 0.7, 0.5])
def test_random_pruning_matches_the_schedule_formula(deit_small, keep):
    patch(deit_small, "random", keep=keep)
    report = count_flops(deit_small)
    counts = [(layer.tokens_in, layer.tokens_out) for layer in report.layers]
    assert report.total == pytest.approx(analytic_gmacs(counts), rel=1e-9)


def test_topk_class_attention_row_is_counted(deit_small):
    patch(deit_small, "topk", keep=0.7)
    report = count_flops(deit_small)
    counts = [(layer.tokens_in, layer.tokens_out) for layer in report.layers]
    # the class-token row of attention: 1 x N scores per head, H * N * D = N * C MACs
    assert report.total == pytest.approx(analytic_gmacs(counts, extra_per_reduction=lambda n: n * 384), rel=1e-9)


def test_operator_cost_is_attributed_per_layer(deit_small):
    patch(deit_small, "grid", keep=0.7)
    report = count_flops(deit_small)
    reducing = [layer for layer in report.layers if layer.tokens_out < layer.tokens_in]
    assert [layer.layer for layer in reducing] == [3, 6, 9]
    # size-weighted pooling: one scatter-add per input element (tokens, then sizes)
    for layer in reducing:
        assert layer.operator == pytest.approx(layer.tokens_in * (384 + 1) * 1e-9, rel=1e-9)
    assert all(layer.operator == 0 for layer in report.layers if layer.tokens_out == layer.tokens_in)
    assert "aten::scatter_add_" not in report.uncounted


def test_distilled_has_two_prefix_tokens():
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).eval()
    patch(model, "topk", keep=0.5)
    report = count_flops(model)
    assert report.num_prefix == 2
    assert report.layers[3].tokens_out == 98


# --- per-block columns that add up (issue 16) --------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tpool_cli.profile import COLUMNS, ProfileResult, rounded_parts  # noqa: E402
from tpool_cli.schedule import Schedule  # noqa: E402


def block_formula(n_in, n_out, c=384, p=1, mlp_ratio=4):
    """Analytic (attention, mlp, other) MACs of one block: attention on n_in + p tokens, MLP on n_out + p."""
    a, b = n_in + p, n_out + p
    return 4 * a * c * c + 2 * a * a * c, 2 * mlp_ratio * b * c * c, 5 * a * c + 5 * b * c


def test_deit_s_topk_columns_match_the_per_block_formula(deit_small):
    patch(deit_small, "topk", keep=0.7)
    report = count_flops(deit_small)
    assert report.layers[3].attention == pytest.approx(0.1460, abs=5e-5)  # 197 tokens: qkv + QK^T + AV + proj
    for layer in report.layers:
        attention, mlp, other = block_formula(layer.tokens_in, layer.tokens_out)
        reduces = layer.tokens_out < layer.tokens_in
        assert layer.attention == pytest.approx(attention * 1e-9, rel=1e-12), layer
        assert layer.mlp == pytest.approx(mlp * 1e-9, rel=1e-12), layer
        assert layer.other == pytest.approx(other * 1e-9, rel=1e-12), layer
        # the operator's price: the class-token row of attention it ranks by (N x C MACs)
        assert layer.operator == pytest.approx((layer.tokens_in + 1) * 384 * 1e-9 if reduces else 0.0, rel=1e-12)
        assert layer.attention + layer.mlp + layer.operator + layer.other == pytest.approx(layer.total, abs=1e-15)


@pytest.mark.parametrize("op", ["random", "grid", "wkmeans", "kmedoids", "tome", "evit", "drop"])
def test_columns_sum_to_block_totals_and_follow_the_formula(op):
    from conftest import tiny_vit

    model = tiny_vit()
    patch(model, op, keep=0.7)
    report = count_flops(model)
    assert any(layer.tokens_out < layer.tokens_in for layer in report.layers)
    for layer in report.layers:
        attention, mlp, other = block_formula(layer.tokens_in, layer.tokens_out, c=64)
        assert round(layer.attention * 1e9) == attention, (op, layer)  # explicit or fused attention alike
        assert round(layer.mlp * 1e9) == mlp and round(layer.other * 1e9) == other, (op, layer)
        assert round(layer.total * 1e9) == round((layer.attention + layer.mlp + layer.operator + layer.other) * 1e9)
        assert layer.operator >= 0
    assert report.total == pytest.approx(report.stem + report.head + sum(layer.total for layer in report.layers), abs=1e-15)


def test_json_row_parts_add_up_exactly():
    from conftest import tiny_vit

    model = tiny_vit()
    patch(model, "tome", keep=0.7)
    report = count_flops(model)
    baseline = 2 * report.total
    row = ProfileResult("tome", Schedule(keep=0.7), report, baseline).row("tiny", 32)
    for layer in row["per_layer"]:
        parts = [round(layer[c] * 1e9) for c in COLUMNS]
        assert sum(parts) == round(layer["total"] * 1e9)  # exact MAC counts (9 decimals of GMACs)
    columns = [row[f"{c}_gmacs"] for c in COLUMNS] + [row["stem_gmacs"], row["head_gmacs"]]  # the CSV's columns
    assert sum(round(v * 1e9) for v in columns) == round(row["gmacs"] * 1e9)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=6))
def test_shown_parts_add_up_to_the_shown_total(macs):
    shown = rounded_parts([m * 1e-9 for m in macs])
    assert round(sum(shown) * 1e4) == round(sum(macs) / 1e5)  # the rounded parts sum to the rounded total
    assert all(abs(s - m * 1e-9) < 1e-4 for s, m in zip(shown, macs))  # each moves by less than one shown unit
