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
