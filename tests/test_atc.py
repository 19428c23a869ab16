"""ATC: the batched agglomerative clustering gives scikit-learn's partition; the operator's invariants."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_vit
from tpool_cli.ops import make_operator
from tpool_cli.ops.atc import agglomerative_labels, cosine_distances
from tpool_cli.ops.base import ReduceContext
from tpool_cli.patch import patch, planned_counts

sklearn_cluster = pytest.importorskip("sklearn.cluster")

LINKAGES = ["average", "complete", "single"]
SHAPES = [(3, 10, 1), (2, 30, 7), (2, 64, 20), (1, 97, 60)]  # (B, N, K), N not a square, K = 1 and K close to N


def same_partition(a: torch.Tensor, b) -> bool:
    """Equal up to relabelling: the label pairs form a bijection."""
    a, b = a.tolist(), list(b)
    return len(set(zip(a, b))) == len(set(a)) == len(set(b))


def sklearn_labels(dist: torch.Tensor, k: int, linkage: str):
    return sklearn_cluster.AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage=linkage).fit(dist.numpy()).labels_


@pytest.mark.parametrize("linkage", LINKAGES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_partition_matches_scikit_learn(linkage, dtype):
    gen = torch.Generator().manual_seed(7)
    for b, n, k in SHAPES:
        dist = cosine_distances(torch.randn(b, n, 8, generator=gen)).to(dtype)
        labels = agglomerative_labels(dist, k, linkage)
        assert labels.shape == (b, n) and labels.min() == 0 and labels.max() == k - 1
        for i in range(b):
            assert same_partition(labels[i], sklearn_labels(dist[i], k, linkage)), (linkage, b, n, k, i)


def test_clusters_are_numbered_by_their_first_member():
    labels = agglomerative_labels(cosine_distances(torch.randn(4, 40, 6)), 9)
    first = torch.stack([torch.stack([(row == c).nonzero()[0, 0] for c in range(9)]) for row in labels])
    assert torch.all(first[:, 1:] > first[:, :-1])


def test_linkages_differ_on_a_chain():
    """Points on a line with growing gaps: single linkage chains them, complete does not."""
    x = torch.tensor([0.0, 1.0, 2.1, 3.3, 4.6, 10.0, 10.5])
    dist = (x[:, None] - x[None, :]).abs().unsqueeze(0).double()
    assert agglomerative_labels(dist, 2, "single").tolist() == [[0, 0, 0, 0, 0, 1, 1]]
    for linkage in LINKAGES:
        assert same_partition(agglomerative_labels(dist, 3, linkage)[0], sklearn_labels(dist[0], 3, linkage))


def _problem(b=3, n=24, c=16, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, keys = torch.randn(b, n, c, generator=gen), torch.randn(b, n, d, generator=gen)
    sizes = torch.randint(1, 4, (b, n), generator=gen).float()
    return x, keys, sizes


@pytest.mark.parametrize("linkage", LINKAGES)
def test_reduce_pools_each_cluster_by_size(linkage):
    x, keys, sizes = _problem()
    out = make_operator("atc", linkage=linkage).reduce(x, 7, ReduceContext(sizes=sizes, keys=keys))
    a = out.assignment
    assert out.tokens.shape == (3, 7, 16) and a.shape == (3, 24)
    for i in range(3):
        assert same_partition(a[i], sklearn_labels(cosine_distances(keys)[i], 7, linkage))
        for c in range(7):
            members = a[i] == c
            want = (x[i, members] * sizes[i, members, None]).sum(0) / sizes[i, members].sum()
            torch.testing.assert_close(out.tokens[i, c], want)
            assert out.sizes[i, c] == sizes[i, members].sum()


def test_identical_tokens_merge_without_change():
    """Duplicated tokens (distance 0) merge first and the merged token equals them."""
    x, keys, sizes = _problem(b=2, n=12)
    x, keys, sizes = torch.cat([x, x], 1), torch.cat([keys, keys], 1), torch.cat([sizes, sizes], 1)
    out = make_operator("atc").reduce(x, 12, ReduceContext(sizes=sizes, keys=keys))
    assert torch.equal(out.assignment[:, :12], out.assignment[:, 12:])
    torch.testing.assert_close(out.tokens, x[:, :12])
    torch.testing.assert_close(out.sizes, 2 * sizes[:, :12])


def test_default_is_average_linkage_with_proportional_attention():
    op = make_operator("atc")
    assert op.linkage == "average" and op.default_prop_attn and op.merges


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_vit_keep_one_identity_and_keep_07_finite(images, dtype):
    model = tiny_vit().to(dtype)
    images = images.to(dtype)
    with torch.no_grad():
        ref = model(images)
        patch(model, "atc", keep=1.0)
        assert torch.equal(model(images), ref)
        patch(model, "atc", keep=0.7, track=True)
        logits = model(images)
    assert torch.isfinite(logits.float()).all() and logits.dtype == dtype
    assert torch.all(model.tpool_state.sizes.sum(1) == 64)
    assert [model.tpool_state.counts[i] for i in range(4)] == planned_counts(model) == [(64, 64), (64, 44), (44, 31), (31, 21)]


def test_compiles_as_one_graph():
    """Few tokens: dynamo unrolls the N - K merge steps, tracing each (the 64-token case is in test_tome_evit)."""
    x, keys, sizes = _problem(b=2, n=9)
    op = make_operator("atc", linkage="complete")

    def reduce(x, keys, sizes):
        out = op.reduce(x, 6, ReduceContext(sizes=sizes, keys=keys))
        return out.tokens, out.sizes, out.assignment

    torch._dynamo.reset()
    got = torch.compile(reduce, fullgraph=True, backend="eager")(x, keys, sizes)
    torch._dynamo.reset()
    for g, want in zip(got, reduce(x, keys, sizes)):
        assert torch.equal(g, want)


def greedy_reference(dist: torch.Tensor, k: int, linkage: str) -> list[int]:
    """The specification, one image, plainly: merge the closest pair (first in row-major order
    among equal distances, i < j) until k clusters remain; the merged cluster takes i's index and
    Lance-Williams distances (average: scipy's (n_i d_i + n_j d_j) / (n_i + n_j)); clusters are
    numbered in the order of their lowest member."""
    d = dist.clone().fill_diagonal_(float("inf"))
    n = d.shape[0]
    alive, count, label = list(range(n)), [1.0] * n, list(range(n))
    for _ in range(n - k):
        best = min((d[i, j].item(), i, j) for a, i in enumerate(alive) for j in alive[a + 1 :])
        _, i, j = best
        if linkage == "average":
            row = (count[i] * d[i] + count[j] * d[j]) / (count[i] + count[j])
        else:
            row = torch.maximum(d[i], d[j]) if linkage == "complete" else torch.minimum(d[i], d[j])
        d[i], d[:, i] = row, row
        d[i, i] = float("inf")
        count[i] += count[j]
        alive.remove(j)
        label = [i if lab == j else lab for lab in label]
    order = {root: c for c, root in enumerate(sorted(set(label)))}
    return [order[lab] for lab in label]


@pytest.mark.parametrize("linkage", LINKAGES)
def test_ties_follow_the_row_major_rule(linkage):
    """Distances on a few integer levels (many exact ties): the same labels as the plain greedy."""
    gen = torch.Generator().manual_seed(3)
    for b, n, k in [(3, 12, 4), (2, 25, 9), (2, 40, 3)]:
        upper = torch.randint(1, 4, (b, n, n), generator=gen).double().triu(1)
        dist = upper + upper.transpose(1, 2)
        labels = agglomerative_labels(dist, k, linkage)
        for i in range(b):
            assert labels[i].tolist() == greedy_reference(dist[i], k, linkage), (linkage, n, k, i)
