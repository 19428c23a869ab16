"""Baseline FLOPs of timm's Eva family (rope, SwiGLU) against the analytic formula of docs/flops.md."""

import pytest
import timm

from tpool_cli.flops import count_flops


def eva_macs(patches, prefix, c, depth, hidden, glu, patch_k, final_norm_tokens, classes=0):
    """Patch embed + depth x (2 norms, qkv + proj, QK^T + AV, MLP) + final norm + head, in MACs.

    MLP: fc1 C -> H and fc2 H -> C; a SwiGLU's fc1 is C -> 2H (gate and value), its SiLU x value
    product elementwise. Rope (sin/cos products on q and k) is elementwise: uncounted.
    """
    n = patches + prefix
    mlp = n * c * hidden * (3 if glu else 2)
    block = 10 * n * c + 4 * n * c * c + 2 * n * n * c + mlp
    return patches * patch_k * c + depth * block + 5 * final_norm_tokens * c + c * classes


@pytest.mark.parametrize(
    "name, expected",
    [
        # 224 px / 14: 256 patches + class token; SwiGLU hidden 512 (ratio 4 x 2/3); fc_norm on the pooled token
        ("eva02_tiny_patch14_224", eva_macs(256, 1, 192, 12, 512, True, 3 * 14 * 14, final_norm_tokens=1)),
        # 256 px / 16: 256 patches + class + 4 registers; GELU MLP ratio 4; final norm on every token
        ("vit_small_patch16_dinov3", eva_macs(256, 5, 384, 12, 1536, False, 3 * 16 * 16, final_norm_tokens=261)),
    ],
)
def test_eva_baselines_match_the_formula(name, expected):
    model = timm.create_model(name, pretrained=False).eval()
    for counter in ("fvcore", "torch"):
        report = count_flops(model, counter=counter)
        assert round(report.total * 1e9) == expected, counter
        layer = report.layers[0]
        assert round(layer.attention * 1e9) + round(layer.mlp * 1e9) + round(layer.other * 1e9) == round(layer.total * 1e9)
        assert layer.operator == 0
    uncounted = count_flops(model).uncounted
    assert "aten::mul" in uncounted and "aten::neg" in uncounted  # rope's rotate-half products, listed
