"""Model loading: local weights through timm's pretrained path, offline failures that are quick and clear."""

import time

import pytest
import torch
from safetensors.torch import save_file

from tpool_cli.errors import TpoolError
from tpool_cli.models import load_model


def _weights(tmp_path, suffix):
    torch.manual_seed(3)
    reference = load_model("deit_tiny_patch16_224", random_init=True).model
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    return reference, path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_load_exactly(tmp_path, suffix):
    reference, path = _weights(tmp_path, suffix)
    loaded = load_model("deit_tiny_patch16_224", weights=path)
    assert loaded.weights == str(path) and len(loaded.weights_sha256) == 64
    assert not loaded.model.training
    for (name, a), b in zip(reference.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_missing_weights_file(tmp_path):
    with pytest.raises(TpoolError, match="weights file not found"):
        load_model("deit_tiny_patch16_224", weights=tmp_path / "nope.pth")


def test_weights_of_another_model(tmp_path):
    _, path = _weights(tmp_path, ".safetensors")
    with pytest.raises(TpoolError, match="could not build deit_small_patch16_224 with weights"):
        load_model("deit_small_patch16_224", weights=path)


def test_offline_pretrained_fails_fast_and_clearly():
    start = time.monotonic()
    with pytest.raises(TpoolError, match="--weights PATH"):
        load_model("deit_tiny_patch16_224")
    assert time.monotonic() - start < 10


def test_unknown_model_suggests_names():
    with pytest.raises(TpoolError, match="did you mean deit_small"):
        load_model("deit_smal")


def test_non_vit_model_is_a_clear_error():
    with pytest.raises(TpoolError, match="not a timm VisionTransformer"):
        load_model("resnet18", random_init=True)


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(TpoolError, match="could not build deit_tiny_patch16_224 with weights"):
        load_model("deit_tiny_patch16_224", weights=path)
