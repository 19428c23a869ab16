"""Shared fixtures: tiny timm ViTs (CPU, seconds) and an offline hub."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for a hub in tests
os.environ.setdefault("TPOOL_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "tpool-test-cache"))

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2)  # 8x8 = 64 patch tokens


def tiny_vit(name: str = "vit_tiny_patch16_224", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random-init timm model of the given family (64 patch tokens, depth 4)."""
    torch.manual_seed(seed)
    kwargs = {**TINY, **overrides}
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()


# Families the patch must support: plain ViT, LayerScale (deit3), distilled (2 prefix tokens),
# q/k-norm with register tokens (5 prefix tokens), and gated attention without fused attention.
FAMILIES = {
    "vit": lambda: tiny_vit(),
    "deit3_layerscale": lambda: tiny_vit("deit3_small_patch16_224", init_values=0.5),
    "deit_distilled": lambda: tiny_vit("deit_tiny_distilled_patch16_224"),
    "qknorm_registers": lambda: tiny_vit(qk_norm=True, reg_tokens=4),
}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread for every test, as the test subprocesses get (OMP_NUM_THREADS=1): the tiny
    models gain nothing from more, and on a shared 2-core machine oversubscribed threads make them
    10-100x slower. Results do not depend on it (tests that compare outputs run both sides alike)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)
