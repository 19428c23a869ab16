"""Both FLOP counters agree on the families the patch gained (avg/map pooling heads, Eva with rope):
unpatched and patched with a pruning, a clustering and a merging operator (tiny configs)."""

from __future__ import annotations

import pytest
import timm
import torch

from tpool_cli.flops import AGREEMENT_TOLERANCE, compare_counters
from tpool_cli.patch import patch

SMALL = dict(img_size=32, patch_size=4, depth=3, num_classes=10, embed_dim=64, num_heads=2)
FAMILIES = {
    "vit_avg": "vit_medium_patch16_gap_256",
    "vit_map": "vit_base_patch16_siglip_224",
    "eva02": "eva02_tiny_patch14_224",
    "rope_mixed": "vit_small_patch16_rope_mixed_224",
    "dinov3": "vit_small_patch16_dinov3",
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("op", ["none", "random", "kmeans", "tome"])
def test_counters_agree_on_the_new_families(family, op):
    torch.manual_seed(0)
    model = timm.create_model(FAMILIES[family], pretrained=False, **SMALL).eval()
    if op != "none":
        patch(model, op, keep=0.7)
    agreement = compare_counters(model)
    assert agreement.max_rel_diff <= AGREEMENT_TOLERANCE, (agreement.where, agreement.max_rel_diff)
    fv, tc = agreement.reports
    assert fv.total > 0 and [(a.tokens_in, a.tokens_out) for a in fv.layers] == [(b.tokens_in, b.tokens_out) for b in tc.layers]
