"""DPC-KNN: density and distance by hand, one centre per well-separated group, the operator's invariants."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_vit
from tpool_cli.errors import TpoolError
from tpool_cli.ops import make_operator
from tpool_cli.ops.base import ReduceContext
from tpool_cli.ops.dpcknn import density_and_distance, dpc_knn_assignment, token_distances
from tpool_cli.patch import patch, planned_counts

# six tokens on a line (C = 1, so the 1/sqrt(C) normalisation is 1): two groups
LINE = torch.tensor([0.0, 1.0, 3.0, 10.0, 10.5, 13.0]).view(1, 6, 1)


def test_density_and_distance_match_a_hand_computation():
    """knn = 3 counts the token itself (distance 0) and its two nearest neighbours."""
    rho, delta = density_and_distance(token_distances(LINE), 3, None)
    # mean squared distance to the 3 nearest (self included): 0: (0+1+9)/3, 1: (0+1+4)/3, 3: (0+4+9)/3,
    # 10: (0+0.25+9)/3, 10.5: (0+0.25+6.25)/3, 13: (0+6.25+9)/3
    want_rho = [math.exp(-v / 3) for v in (10, 5, 13, 9.25, 6.5, 15.25)]
    # density order: 1 > 10.5 > 10 > 0 > 3 > 13; distance to the nearest denser token, the densest gets
    # the largest distance in the image (13 - 0)
    want_delta = [1.0, 13.0, 2.0, 0.5, 9.5, 2.5]
    torch.testing.assert_close(rho[0], torch.tensor(want_rho), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(delta[0], torch.tensor(want_delta))
    # the noise (< 1e-6) changes nothing here
    noisy_rho, noisy_delta = density_and_distance(token_distances(LINE), 3, torch.full((1, 6), 5e-7))
    torch.testing.assert_close(noisy_rho, rho + 5e-7)
    torch.testing.assert_close(noisy_delta, delta)


def test_centres_by_density_times_distance_and_nearest_centre_assignment():
    # scores rho * delta: token 1 (13 e^-5/3) first, token 10.5 (9.5 e^-6.5/3) second
    assignment = dpc_knn_assignment(token_distances(LINE), 2, 3, None)
    assert assignment.tolist() == [[0, 0, 0, 1, 1, 1]]
    out = make_operator("dpcknn", knn=3).reduce(LINE, 2, ReduceContext(sizes=torch.ones(1, 6)))
    # equal weights, normalised by (count + 1e-6) as the reference's merge_tokens
    torch.testing.assert_close(out.tokens[0, :, 0], torch.tensor([4 / (3 + 1e-6), 33.5 / (3 + 1e-6)]))
    assert out.sizes.tolist() == [[3.0, 3.0]]


def test_equal_densities_break_by_index_without_noise():
    x = torch.tensor([0.0, 1.0, 5.0, 6.0]).view(1, 4, 1)  # every token's nearest neighbour at 1: four equal densities
    rho, delta = density_and_distance(token_distances(x), 2, None)
    assert torch.all(rho[0] == rho[0, 0])
    # the lower index counts as denser: token 0 is the peak (largest distance, 6), 2's nearest denser is 1 (at 4)
    assert delta[0].tolist() == [6.0, 1.0, 4.0, 1.0]


def _groups(b: int, groups: int, per: int, c: int = 12, seed: int = 0):
    """b images, each `groups` tight clusters of `per` tokens around far-apart centres, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, groups, c, generator=gen) * 20
    x = centres.repeat_interleave(per, dim=1) + 0.1 * torch.randn(b, groups * per, c, generator=gen)
    label = torch.arange(groups).repeat_interleave(per).expand(b, -1)
    order = torch.argsort(torch.rand(b, groups * per, generator=gen), dim=1)
    return x.gather(1, order[..., None].expand_as(x)), label.gather(1, order)


@pytest.mark.parametrize("ties", ["noise", "index"])
def test_one_centre_per_group_and_every_member_joins_it(ties):
    x, label = _groups(b=3, groups=5, per=8)
    out = make_operator("dpcknn", ties=ties).reduce(x, 5, ReduceContext(sizes=torch.ones(3, 40)))
    for i in range(3):
        pairs = set(zip(label[i].tolist(), out.assignment[i].tolist()))
        assert len(pairs) == 5 and len({p[1] for p in pairs}) == 5  # a bijection groups <-> clusters
        for g, c in pairs:
            torch.testing.assert_close(out.tokens[i, c], x[i, label[i] == g].mean(0), atol=1e-4, rtol=1e-5)
    assert torch.all(out.sizes == 8)


def test_weights_size_option_and_summed_sizes():
    x, label = _groups(b=2, groups=3, per=6)
    sizes = torch.randint(1, 5, (2, 18)).float()
    out = make_operator("dpcknn", weights="size").reduce(x, 3, ReduceContext(sizes=sizes))
    for i in range(2):
        for c in range(3):
            m = out.assignment[i] == c
            want = (x[i, m] * sizes[i, m, None]).sum(0) / (sizes[i, m].sum() + 1e-6)
            torch.testing.assert_close(out.tokens[i, c], want)
            assert out.sizes[i, c] == sizes[i, m].sum()


def test_keys_features_are_requested_and_used():
    op = make_operator("dpcknn", features="keys")
    assert op.needs() == frozenset({"keys"}) and make_operator("dpcknn").needs() == frozenset()
    keys, label = _groups(b=1, groups=4, per=5)
    x = torch.randn(1, 20, 7)  # the tokens carry no group structure: the keys decide
    out = op.reduce(x, 4, ReduceContext(sizes=torch.ones(1, 20), keys=keys))
    assert len(set(zip(label[0].tolist(), out.assignment[0].tolist()))) == 4


def test_bad_knn_is_one_clear_error():
    with pytest.raises(TpoolError, match="knn must be >= 1"):
        make_operator("dpcknn", knn=0)


def test_defaults_are_the_reference():
    op = make_operator("dpcknn")
    assert (op.knn, op.features, op.weights, op.ties) == (5, "tokens", "equal", "noise")
    assert op.merges and not op.default_prop_attn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_vit_keep_one_identity_and_keep_07_finite(images, dtype):
    model = tiny_vit().to(dtype)
    images = images.to(dtype)
    with torch.no_grad():
        ref = model(images)
        patch(model, "dpcknn", keep=1.0)
        assert torch.equal(model(images), ref)
        patch(model, "dpcknn", keep=0.7, track=True)
        logits = model(images)
    assert torch.isfinite(logits.float()).all() and logits.dtype == dtype
    assert torch.all(model.tpool_state.sizes.sum(1) == 64)
    assert [model.tpool_state.counts[i] for i in range(4)] == planned_counts(model)
