"""The counter-based draw behind `random`: exact, bijective, uniform enough, stateless."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_vit
from tpool_cli.ops.common import hash32, hash_uniform
from tpool_cli.patch import patch

CPU = torch.device("cpu")


def _reference(x: int) -> int:
    """lowbias32 in plain Python integers (no overflow possible)."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
def test_tensor_and_int_paths_match_the_reference(values):
    expected = [_reference(v) for v in values]
    assert [hash32(v) for v in values] == expected
    assert hash32(torch.tensor(values, dtype=torch.int64)).tolist() == expected


def test_distinct_counters_give_distinct_bits():
    bits = hash32(torch.arange(1 << 16, dtype=torch.int64) ^ hash32(7))
    assert bits.unique().numel() == 1 << 16 and int(bits.min()) >= 0 and int(bits.max()) < 2**32


def test_scores_are_uniform_and_selection_is_fair():
    u = hash_uniform(0, 2048, 196, CPU)
    assert u.shape == (2048, 196) and u.dtype == torch.float32 and 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.std()) - 12**-0.5) < 0.005
    # keep 98 of 196: every position is kept in half the images (binomial, sd 1.1 %)
    kept = torch.bincount(u.topk(98, dim=1).indices.flatten(), minlength=196).float() / 2048
    assert float((kept - 0.5).abs().max()) < 0.06
    # neighbouring tokens, neighbouring images and different seeds are uncorrelated
    v = hash_uniform(1, 2048, 196, CPU)
    for a, b in ((u[:, :-1], u[:, 1:]), (u[:-1], u[1:]), (u, v)):
        assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.01


def test_random_forward_is_stateless(images):
    model = tiny_vit()
    patch(model, "random", keep=0.5, layers=(1, 2), seed=3)
    with torch.no_grad():
        first, second = model(images), model(images)
    assert torch.equal(first, second)  # no generator advancing between calls
    assert model.tpool_state.block_seed(1) != model.tpool_state.block_seed(2)
