"""ATC: the batched agglomerative clustering gives scikit-learn's partition; the operator's invariants."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import tiny_vit
from tpool_cli.ops import make_operator
from tpool_cli.ops.atc import agglomerative_labels, cosine_distances, key_labels, reciprocal_labels, sequential_labels
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


IMPLEMENTATIONS = [reciprocal_labels, sequential_labels]  # eager, compiled


def float64_cosine_distances(x: torch.Tensor) -> torch.Tensor:
    """1 - cos computed in float64 (distances cast from float32 tie at this many pairs: not a test of the rule)."""
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    d = 1 - x @ x.transpose(1, 2)
    return torch.where(torch.ones_like(d[0], dtype=torch.bool).triu(1), d, d.transpose(1, 2))


@pytest.mark.parametrize("labels_of", IMPLEMENTATIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("linkage", LINKAGES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_partition_matches_scikit_learn(labels_of, linkage, dtype):
    gen = torch.Generator().manual_seed(7)
    for b, n, k in SHAPES + [(4, 196, 137), (2, 196, 98)]:  # 196 tokens at keep 0.7 and 0.5, as in DeiT-S
        x = torch.randn(b, n, 8 if n < 196 else 64, generator=gen)
        dist = cosine_distances(x) if dtype == torch.float32 else float64_cosine_distances(x)
        labels = labels_of(dist, k, linkage)
        assert labels.shape == (b, n) and labels.min() == 0 and labels.max() == k - 1
        for i in range(b):
            assert same_partition(labels[i], sklearn_labels(dist[i], k, linkage)), (linkage, b, n, k, i)


def test_eager_runs_the_rounds():
    """Outside torch.compile the labels come from the rounds (same partition as the sequential form here)."""
    dist = cosine_distances(torch.randn(3, 50, 8))
    assert torch.equal(agglomerative_labels(dist, 20), reciprocal_labels(dist, 20))
    assert torch.equal(reciprocal_labels(dist, 20), sequential_labels(dist, 20))


def test_autocast_keeps_float32_distances():
    """Under bf16 autocast (CUDA's default AMP) the clustering still runs on float32 distances: same assignment."""
    gen = torch.Generator().manual_seed(5)
    x, keys = torch.randn(2, 60, 16, generator=gen), torch.randn(2, 60, 8, generator=gen) + 3.0  # bf16 would tie these
    ctx = ReduceContext(sizes=torch.ones(2, 60), keys=keys)
    ref = make_operator("atc")(x, 25, ctx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = make_operator("atc")(x, 25, ctx)
    assert torch.equal(amp.assignment, ref.assignment) and torch.equal(amp.tokens, ref.tokens)


@pytest.mark.parametrize("linkage", LINKAGES)
def test_operator_path_is_the_pure_function(linkage):
    """key_labels writes the distances straight into the rounds' padded matrix: same distances, same labels."""
    keys = torch.randn(3, 196, 64, generator=torch.Generator().manual_seed(3))
    dist = cosine_distances(keys)
    out = torch.full((3, 197, 197), 5.0)
    assert torch.equal(cosine_distances(keys, out=out[:, :196, :196]), dist) and torch.equal(out[:, :196, :196], dist)
    assert torch.equal(out[:, 196], torch.full((3, 197), 5.0))  # nothing written outside the view
    for k in (137, 98, 1):
        assert torch.equal(key_labels(keys, k, linkage), agglomerative_labels(dist, k, linkage))


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


def _full_matrix_loops(k: int, b: int = 2, n: int = 12) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Inductor's C++ for ``sequential_labels`` to k clusters: how many of its loops run over a whole
    B x W x W matrix or more (N = 12 is whole blocks of 3, so W = N), its labels and eager's."""
    from torch._inductor.utils import run_and_get_code

    dist = cosine_distances(torch.randn(b, n, 8, generator=torch.Generator().manual_seed(5)))
    torch._dynamo.reset()
    labels, code = run_and_get_code(torch.compile(lambda d: sequential_labels(d, k, "average"), fullgraph=True), dist)
    torch._dynamo.reset()
    extents = [int(e) for e in re.findall(r"x0<static_cast<int64_t>\((\d+)L\)", "\n".join(code))]
    return sum(e >= b * n * n for e in extents), labels, sequential_labels(dist, k, "average")


def test_compiled_merge_steps_do_no_whole_matrix_pass():
    """Inductor must update the matrix in place: a step touches O(N sqrt(N)) entries. Written
    through views of one shared buffer, the generated code copied the whole matrix (and its block
    minima) at every step: compiled atc was 5-9x slower than eager on the CPU (docs/benchmarks.md)."""
    few, few_labels, few_eager = _full_matrix_loops(k=10)  # 2 merge steps
    more, more_labels, more_eager = _full_matrix_loops(k=7)  # 5
    assert torch.equal(few_labels, few_eager) and torch.equal(more_labels, more_eager)
    assert few == more, f"whole-matrix loops grow with the merge steps: {few} for 2 steps, {more} for 5"


def _closest_pair_greedy(dist: torch.Tensor, k: int, linkage: str, pick) -> list[int] | None:
    """One image, plainly: merge a closest pair until k clusters remain; the merged cluster takes
    i's index and Lance-Williams distances (average: scipy's (n_i d_i + n_j d_j) / (n_i + n_j)).
    ``pick`` chooses among the closest pairs (i < j, row-major order); None from it stops the run.
    Returns every point's cluster, numbered in the order of their lowest member (None if stopped)."""
    d = dist.clone().fill_diagonal_(float("inf"))
    n = d.shape[0]
    alive, count, label = list(range(n)), [1.0] * n, list(range(n))
    for _ in range(n - k):
        closest = min(d[i, j].item() for a, i in enumerate(alive) for j in alive[a + 1 :])
        chosen = pick([(i, j) for a, i in enumerate(alive) for j in alive[a + 1 :] if d[i, j].item() == closest])
        if chosen is None:
            return None
        i, j = chosen
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


def greedy_reference(dist: torch.Tensor, k: int, linkage: str) -> list[int]:
    """The specification: the closest pair first in row-major order among equal distances."""
    return _closest_pair_greedy(dist, k, linkage, lambda pairs: pairs[0])


def _tied_distances(b: int, n: int, levels: int, gen: torch.Generator) -> torch.Tensor:
    upper = torch.randint(1, levels, (b, n, n), generator=gen).double().triu(1)
    return upper + upper.transpose(1, 2)


@pytest.mark.parametrize("linkage", LINKAGES)
def test_sequential_ties_follow_the_row_major_rule(linkage):
    """Distances on a few integer levels (many exact ties): the same labels as the plain greedy."""
    gen = torch.Generator().manual_seed(3)
    for b, n, k in [(3, 12, 4), (2, 25, 9), (2, 40, 3)]:
        dist = _tied_distances(b, n, 4, gen)
        labels = sequential_labels(dist, k, linkage)
        for i in range(b):
            assert labels[i].tolist() == greedy_reference(dist[i], k, linkage), (linkage, n, k, i)


def reached_by_some_tie_order(dist: torch.Tensor, k: int, linkage: str, labels: torch.Tensor) -> bool:
    """Does a closest-pair greedy that breaks ties towards pairs inside one cluster of ``labels`` end at them?

    True means the partition is one that agglomerative clustering gives under some order of the
    equal distances (what "ties aside" allows); a merge across the given clusters at the closest
    distance, or a different end, means it is not.
    """
    want = labels.tolist()
    got = _closest_pair_greedy(dist, k, linkage, lambda pairs: next(((i, j) for i, j in pairs if want[i] == want[j]), None))
    return got is not None and same_partition(torch.tensor(got), want)


@pytest.mark.parametrize("linkage", LINKAGES)
def test_rounds_under_ties_give_a_partition_some_tie_order_gives(linkage):
    """Many exact ties (one or three distance levels): K clusters that the closest-pair greedy reaches under some tie order."""
    gen = torch.Generator().manual_seed(3)
    for b, n, k in [(3, 12, 4), (2, 25, 9), (2, 40, 3), (3, 30, 20)]:
        for levels in (2, 4):
            dist = _tied_distances(b, n, levels, gen)
            labels = reciprocal_labels(dist, k, linkage)
            for i in range(b):
                assert sorted(set(labels[i].tolist())) == list(range(k))
                assert reached_by_some_tie_order(dist[i], k, linkage, labels[i]), (linkage, n, k, levels, i)


@pytest.mark.parametrize("labels_of", IMPLEMENTATIONS, ids=lambda f: f.__name__)
def test_all_equal_and_nan_distances_still_give_k_labels(labels_of):
    """Degenerate inputs end with labels in [0, k): every distance equal; a NaN pair (a NaN key upstream)."""
    assert all(len(set(row.tolist())) == 3 for row in labels_of(torch.zeros(2, 10, 10), 3))
    dist = cosine_distances(torch.randn(1, 8, 4))
    dist[0, 2, 3] = dist[0, 3, 2] = float("nan")
    labels = labels_of(dist, 3)
    assert labels.shape == (1, 8) and 0 <= labels.min() and labels.max() <= 2


def _chain(n: int) -> torch.Tensor:
    """d(i, j) = j + 0.001 i for i < j: average linkage absorbs one point per round (a chain)."""
    i = torch.arange(n, dtype=torch.float64)
    upper = (i[None] + 1e-3 * i[:, None]).triu(1)
    return upper + upper.T


def test_rounds_do_not_depend_on_the_batch_over_many_padded_rounds():
    """An image padded in 150 rounds (its batch-mate merges more per round) keeps its own partition.

    Found in review: the dummy slot's count doubled in each padded round and overflowed to inf
    after 128, turning the image's distances NaN and stopping its merges.
    """
    n = 300
    two_chains = torch.full((n, n), 1e6, dtype=torch.float64)
    two_chains[:150, :150] = _chain(150)
    two_chains[150:, 150:] = _chain(150) + 0.5
    dist = torch.stack([two_chains, _chain(n)]).float()
    alone = reciprocal_labels(dist[1:], 2)[0]
    assert torch.equal(reciprocal_labels(dist, 2)[1], alone)
    assert same_partition(alone, sklearn_labels(dist[1], 2, "average"))
