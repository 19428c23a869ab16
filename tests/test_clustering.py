"""Token Pooling operators (kmeans, kmedoids, wkmeans, wkmedoids) against brute-force loop references."""

import math

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_vit
from tpool_cli.errors import TpoolError
from tpool_cli.flops import count_flops
from tpool_cli.ops import make_operator
from tpool_cli.ops.base import KEYS, SIGNIFICANCE, ReduceContext
from tpool_cli.ops.clustering import (
    clustering_weights, farthest_init, kmeans, kmeans_step, kmedoids, medoid_update, objective, significance_init,
)
from tpool_cli.ops.common import gather_tokens
from tpool_cli.patch import patch

CLUSTERING = ["kmeans", "kmedoids", "wkmeans", "wkmedoids"]


# ---------------------------------------------------------------- brute-force references (one image, float64 loops)


def sqdist(u, v):
    return sum((float(a) - float(b)) ** 2 for a, b in zip(u, v))


def ref_assign(f, centers):
    return [min(range(len(centers)), key=lambda c: (sqdist(fi, centers[c]), c)) for fi in f]


def ref_kmeans(f, w, seeds, iters):
    centers = [list(map(float, f[s])) for s in seeds]
    a = None
    for _ in range(iters):
        a = ref_assign(f, centers)
        for c in range(len(centers)):
            members = [i for i in range(len(f)) if a[i] == c]
            total = sum(float(w[i]) for i in members)
            if total > 0:
                centers[c] = [sum(float(w[i]) * float(f[i][d]) for i in members) / total for d in range(len(f[0]))]
    return a, centers


def ref_medoid(f, w, members):
    """argmin over members m of sum_{j in cluster} w_j ||f_j - f_m||^2 (the correct K-Medoids update)."""
    return min(members, key=lambda m: (sum(float(w[j]) * sqdist(f[j], f[m]) for j in members), m))


def buggy_medoid(f, w, members):
    """The known bug of the public reimplementation: scores a candidate against ALL tokens, by its own weight."""
    return min(members, key=lambda m: (float(w[m]) * sum(sqdist(f[j], f[m]) for j in range(len(f))), m))


def ref_kmedoids(f, w, seeds, iters, update=ref_medoid):
    medoids = list(map(int, seeds))
    a = None
    for _ in range(iters):
        a = ref_assign(f, [f[m] for m in medoids])
        for c in range(len(medoids)):
            members = [i for i in range(len(f)) if a[i] == c]
            if members and sum(float(w[i]) for i in members) > 0:
                medoids[c] = update(f, w, members)
    return a, medoids


def ref_farthest(f, w, k):
    total = sum(float(x) for x in w)
    mean = [sum(float(w[i]) * float(f[i][d]) for i in range(len(f))) / total for d in range(len(f[0]))]
    seeds = [min(range(len(f)), key=lambda i: (sqdist(f[i], mean), i))]
    while len(seeds) < k:
        gain = [float(w[i]) * min(sqdist(f[i], f[s]) for s in seeds) for i in range(len(f))]
        seeds.append(max(range(len(f)), key=lambda i: (gain[i], -i)))
    return sorted(seeds)


def problem(seed, b=3, n=14, d=5, k=4, sizes_from_merges=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g)
    sizes = torch.randint(1, 4, (b, n), generator=g).float() if sizes_from_merges else torch.ones(b, n)
    sig = torch.rand(b, n, generator=g) + 0.1
    return x, sizes, sig, k


# ---------------------------------------------------------------- exact agreement with the references


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weighted", [False, True])
def test_kmeans_matches_the_loop_reference(seed, weighted):
    x, sizes, sig, k = problem(seed)
    w = clustering_weights(sizes, sig if weighted else None)
    seeds = significance_init(sig, k)
    a, centers, _ = kmeans(x, w, seeds, iters=5)
    for i in range(x.shape[0]):
        ref_a, ref_centers = ref_kmeans(x[i].tolist(), w[i].tolist(), seeds[i].tolist(), 5)
        assert a[i].tolist() == ref_a
        assert torch.allclose(centers[i].double(), torch.tensor(ref_centers, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weighted", [False, True])
def test_kmedoids_matches_the_loop_reference(seed, weighted):
    x, sizes, sig, k = problem(seed)
    w = clustering_weights(sizes, sig if weighted else None)
    seeds = significance_init(sig, k)
    a, medoids = kmedoids(x, w, seeds, iters=5)
    for i in range(x.shape[0]):
        ref_a, ref_medoids = ref_kmedoids(x[i].tolist(), w[i].tolist(), seeds[i].tolist(), 5)
        assert a[i].tolist() == ref_a
        assert medoids[i].tolist() == ref_medoids


def test_medoid_update_is_the_within_cluster_argmin_not_the_known_bug():
    """One update step on many random clusterings: ours equals the correct rule, and the buggy rule differs."""
    differs = 0
    for seed in range(20):
        x, sizes, sig, k = problem(seed, b=1, n=16, k=3)
        w = clustering_weights(sizes, sig)
        medoids = significance_init(sig, k)
        a = kmeans_step(x, w, gather_tokens(x, medoids))[0]
        ours = medoid_update(x, w, a, medoids)[0].tolist()
        f, wl = x[0].tolist(), w[0].tolist()
        members = [[i for i in range(16) if a[0, i] == c] for c in range(k)]
        assert ours == [ref_medoid(f, wl, m) if m else int(medoids[0, c]) for c, m in enumerate(members)]
        differs += ours != [buggy_medoid(f, wl, m) if m else int(medoids[0, c]) for c, m in enumerate(members)]
    assert differs > 0, "the test inputs do not tell the correct update from the buggy one"


@pytest.mark.parametrize("seed", range(3))
def test_farthest_init_matches_the_loop_reference(seed):
    x, sizes, sig, k = problem(seed, k=5)
    w = clustering_weights(sizes, sig)
    seeds = farthest_init(x, w, k)
    for i in range(x.shape[0]):
        assert seeds[i].tolist() == ref_farthest(x[i].tolist(), w[i].tolist(), k)


def test_significance_init_is_the_top_k():
    sig = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2]])
    assert significance_init(sig, 2).tolist() == [[1, 3]]


@pytest.mark.parametrize("name", CLUSTERING)
@pytest.mark.parametrize("init", ["significance", "farthest"])
def test_operator_outputs_match_the_references(name, init):
    x, sizes, sig, k = problem(7, n=12, d=6, k=5)
    op = make_operator(name, init=init, iters=4)
    out = op(x, k, ReduceContext(sizes=sizes, significance=sig, track=True))
    w = clustering_weights(sizes, sig if name.startswith("w") else None)
    for i in range(x.shape[0]):
        f, wl = x[i].tolist(), w[i].tolist()
        seeds = sorted(sig[i].topk(k).indices.tolist()) if init == "significance" else ref_farthest(f, wl, k)
        if "medoids" in name:
            ref_a, medoids = ref_kmedoids(f, wl, seeds, 4)
            ref_tokens = torch.tensor([f[m] for m in medoids])
        else:
            ref_a, ref_tokens = ref_kmeans(f, wl, seeds, 4)
            ref_tokens = torch.tensor(ref_tokens)
        assert out.assignment[i].tolist() == ref_a
        assert torch.allclose(out.tokens[i], ref_tokens.float(), atol=1e-5)
        ref_sizes = [sum(float(sizes[i, j]) for j in range(12) if ref_a[j] == c) for c in range(k)]
        assert out.sizes[i].tolist() == ref_sizes


# ---------------------------------------------------------------- invariants


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(4, 40), k_frac=st.floats(0.1, 0.9), weighted=st.booleans())
def test_objective_never_increases(seed, n, k_frac, weighted):
    x, sizes, sig, _ = problem(seed, b=2, n=n, d=4)
    k = max(1, min(n - 1, int(n * k_frac)))
    w = clustering_weights(sizes, sig if weighted else None)
    seeds = significance_init(sig, k)
    centers, medoids = gather_tokens(x, seeds), seeds
    last_means = objective(x, w, centers)
    last_medoids = last_means.clone()
    for _ in range(6):
        centers = kmeans_step(x, w, centers)[1]
        a = kmeans_step(x, w, gather_tokens(x, medoids))[0]
        medoids = medoid_update(x, w, a, medoids)
        now_means, now_medoids = objective(x, w, centers), objective(x, w, gather_tokens(x, medoids))
        assert torch.all(now_means <= last_means * (1 + 1e-5) + 1e-5)
        assert torch.all(now_medoids <= last_medoids * (1 + 1e-5) + 1e-5)
        last_means, last_medoids = now_means, now_medoids


@pytest.mark.parametrize("name", CLUSTERING)
@pytest.mark.parametrize("features", ["tokens", "keys"])
def test_deterministic_and_batch_independent(name, features):
    x, sizes, sig, k = problem(3, b=3, n=20, d=8, k=6)
    keys = torch.randn(3, 20, 4, generator=torch.Generator().manual_seed(9))
    op = make_operator(name, features=features)

    def run(sl):
        return op(x[sl], k, ReduceContext(sizes=sizes[sl], significance=sig[sl], keys=keys[sl], track=True))

    full, again = run(slice(None)), run(slice(None))
    assert torch.equal(full.tokens, again.tokens) and torch.equal(full.assignment, again.assignment)
    for i in range(3):
        alone = run(slice(i, i + 1))
        assert torch.equal(alone.assignment[0], full.assignment[i])
        assert torch.allclose(alone.tokens[0], full.tokens[i], atol=1e-6)
        assert torch.equal(alone.sizes[0], full.sizes[i])


@pytest.mark.parametrize("medoids", [False, True])
@pytest.mark.parametrize("init", ["significance", "farthest"])
def test_weighted_equals_unweighted_when_weights_are_equal(medoids, init):
    x, sizes, _, k = problem(5, n=18, k=5)
    sig = torch.full(sizes.shape, 0.5)  # equal significance (a power of two: exact scaling)
    ctx = ReduceContext(sizes=sizes, significance=sig, track=True)
    plain = make_operator("kmedoids" if medoids else "kmeans", init=init)(x, k, ctx)
    weighted = make_operator("wkmedoids" if medoids else "wkmeans", init=init)(x, k, ctx)
    assert torch.equal(plain.assignment, weighted.assignment)
    assert torch.allclose(plain.tokens, weighted.tokens, atol=1e-6)
    assert torch.equal(plain.sizes, weighted.sizes)


def test_empty_cluster_keeps_its_previous_center():
    # two identical seeds: ties go to the lower center index, so center 1 never gets a member
    x = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 6.0]]])
    w = torch.ones(1, 4)
    seeds = torch.tensor([[0, 1, 2]])
    a, centers, wsum = kmeans(x, w, seeds, iters=3)
    assert a.tolist() == [[0, 0, 2, 2]]
    assert wsum.tolist() == [[2.0, 0.0, 2.0]]
    assert centers[0].tolist() == [[0.0, 0.0], [0.0, 0.0], [5.0, 5.5]]
    a, medoids = kmedoids(x, w, seeds, iters=3)
    assert medoids.tolist() == [[0, 1, 2]] and a.tolist() == [[0, 0, 2, 2]]
    out = make_operator("kmeans", init="significance")(
        x, 3, ReduceContext(sizes=w, significance=torch.tensor([[3.0, 2.0, 1.0, 0.0]]))
    )
    assert out.sizes.tolist() == [[2.0, 0.0, 2.0]] and torch.isfinite(out.tokens).all()


def test_keys_features_cluster_keys_but_output_tokens():
    x, sizes, sig, k = problem(2, n=16, d=6, k=4)
    keys = -x[..., :3] * 2  # any features; the output must be averages of x under the key clustering
    out = make_operator("kmeans", features="keys")(x, k, ReduceContext(sizes=sizes, significance=sig, keys=keys, track=True))
    ref_a, _ = ref_kmeans(keys[0].tolist(), sizes[0].tolist(), sorted(sig[0].topk(k).indices.tolist()), 5)
    assert out.assignment[0].tolist() == ref_a
    for c in range(k):
        members = out.assignment[0] == c
        mean = (x[0][members] * sizes[0][members, None]).sum(0) / sizes[0][members].sum()
        assert torch.allclose(out.tokens[0, c], mean, atol=1e-5)


# ---------------------------------------------------------------- options and features


def test_needs_follow_the_options():
    assert make_operator("kmeans").needs() == {SIGNIFICANCE}
    assert make_operator("kmeans", init="farthest").needs() == set()
    assert make_operator("kmedoids", init="farthest", features="keys").needs() == {KEYS}
    assert make_operator("wkmeans", init="farthest").needs() == {SIGNIFICANCE}
    assert make_operator("wkmedoids", features="keys").needs() == {SIGNIFICANCE, KEYS}


@pytest.mark.parametrize("bad, message", [({"iters": 0}, "iters must be"), ({"init": "kmeans++"}, "init must be one of"), ({"features": "values"}, "features must be one of")])
def test_bad_options_are_tpool_errors(bad, message):
    with pytest.raises(TpoolError, match=message):
        make_operator("kmeans", **bad)


def test_label_shows_changed_options():
    assert make_operator("wkmedoids", iters=3, init="farthest").label() == "wkmedoids(iters=3,init=farthest)"


@pytest.mark.parametrize("name", CLUSTERING)
@pytest.mark.parametrize("init, features", [("significance", "tokens"), ("farthest", "keys")])
def test_patched_model_with_each_option(name, init, features, images):
    model = tiny_vit()
    patch(model, name, keep=0.5, layers=(1, 2), track=True, init=init, features=features, iters=2)
    with torch.no_grad():
        out = model(images)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    assert torch.all(model.tpool_state.sizes.sum(1) == 64)


@pytest.mark.parametrize("name", CLUSTERING)
def test_autocast_does_not_lower_distance_precision(name):
    """Under bf16 autocast the distances stay float32: same assignment as without autocast."""
    x, sizes, sig, k = problem(11, b=2, n=30, d=16, k=9)
    x = x + 40.0  # a large common component: bf16 matmul distances would be noise here
    ctx = ReduceContext(sizes=sizes, significance=sig, track=True)
    ref = make_operator(name)(x, k, ctx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = make_operator(name)(x, k, ctx)
    assert torch.equal(ref.assignment, amp.assignment)


# ---------------------------------------------------------------- FLOPs: the operator's own cost is counted


def kmeans_macs(n, k, c, iters):
    """Per image, one reduction: per iteration ||y||^2 (K·C) + the distance matmul (N·K·C), then the
    pooling: token sums (N·C) and weight sums (N)."""
    return iters * (n * k * c + k * c + n * c + n)


def kmedoids_macs(n, k, c, iters):
    """As K-Means, plus ||f_i - mu_a(i)||^2 (N·C) per iteration and the final sizes sum (N)."""
    return iters * (n * k * c + k * c + n * c + n + n * c) + n


@pytest.fixture(scope="module")
def deit_tiny():
    return timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()


@pytest.mark.parametrize("name, formula", [("kmeans", kmeans_macs), ("kmedoids", kmedoids_macs)])
@pytest.mark.parametrize("iters", [1, 5])
def test_operator_gmacs_match_the_formula(deit_tiny, name, formula, iters):
    patch(deit_tiny, name, keep=0.7, iters=iters)
    report = count_flops(deit_tiny)
    reducing = [layer for layer in report.layers if layer.tokens_out < layer.tokens_in]
    assert [(layer.tokens_in, layer.tokens_out) for layer in reducing] == [(196, 137), (137, 96), (96, 67)]
    for layer in reducing:
        expected = formula(layer.tokens_in, layer.tokens_out, 192, iters)
        if name == "kmedoids" and layer is reducing[-1]:
            # nothing reads the sizes of the last reduction, so the trace drops their scatter-add (N)
            expected -= layer.tokens_in
        assert layer.operator == pytest.approx(expected * 1e-9, rel=1e-9)
    assert "aten::linalg_vecdot" not in report.uncounted
    # the distance matmuls dominate: K·N·C per iteration
    assert reducing[0].operator > iters * 196 * 137 * 192 * 1e-9
    assert math.isclose(sum(layer.operator for layer in report.layers), sum(layer.operator for layer in reducing))


def test_farthest_init_adds_the_pairwise_distances_once(deit_tiny):
    patch(deit_tiny, "kmeans", keep=0.7, init="farthest", iters=2)
    report = count_flops(deit_tiny)
    for layer in (layer for layer in report.layers if layer.tokens_out < layer.tokens_in):
        n, k, c = layer.tokens_in, layer.tokens_out, 192
        # weighted mean (N·C), its distances (2·N·C + C), the pairwise distances (N·N·C + 2·N·C)
        expected = kmeans_macs(n, k, c, 2) + n * n * c + 5 * n * c + c
        assert layer.operator == pytest.approx(expected * 1e-9, rel=1e-9)
