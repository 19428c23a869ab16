"""ATC (Haurum et al., "Agglomerative Token Clustering", ECCV 2024): bottom-up clustering of the keys.

Within a block, the patch tokens are clustered bottom-up on the cosine distance of the block's
keys (mean over heads), ``1 - cos``, until K clusters remain; each cluster becomes one token,
the size-weighted mean of its members, whose size is the sum of theirs. ``linkage`` decides the
distance between two clusters: ``average`` (ATC's default: the mean distance over all pairs of
members, UPGMA), ``complete`` (the largest) or ``single`` (the smallest). ATC's reference calls
``sklearn.cluster.AgglomerativeClustering(n_clusters=K, metric="precomputed", linkage=...)``
once per image on the CPU; this module gives the same partition (ties aside) batched on the
model's device:

* the B x N x N distance matrix is made exactly symmetric from its upper triangle (the part
  scikit-learn reads), with +inf on the diagonal;
* for these three linkages (all reducible) the closest-pair greedy builds the same dendrogram as
  scipy's nearest-neighbour chain / minimum spanning tree that scikit-learn uses, and cutting it
  at K clusters keeps exactly its N - K lowest merges;
* eager (:func:`reciprocal_labels`): rounds that merge every pair of mutual nearest neighbours
  at once, skip merges that cannot be among the N - K lowest, and stop once they are all known:
  about 4 rounds at keep 0.7, 6 at keep 0.5 (196 tokens), one host read per round to size it;
* inside ``torch.compile`` (:func:`sequential_labels`): N - K merge steps of fixed batched work,
  no host read, so the graph has no break: the closest pair of every image, its Lance-Williams
  row (average: (n_i d_i + n_j d_j) / (n_i + n_j) with n the member counts; complete: max;
  single: min) written into row and column i, row and column j set to +inf;
* pointer jumping then gives every token its cluster's root (its lowest index), and clusters are
  numbered in the order of their roots.

The two forms give the same partition unless distances tie (each then follows a valid order of
the tied merges; the sequential form takes the pair first in row-major order). The linkage
counts members (tokens of this block), not the patches they stand for, as the reference does
(scikit-learn never sees the sizes); only the pooling uses the sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .base import KEYS, MeanPosition, ReduceContext, Reduction, TokenOperator
from .common import flat_rows, pool_by_assignment

Linkage = Literal["average", "complete", "single"]


def cosine_distances(keys: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """B x N x D features -> B x N x N float32 ``1 - cos``, exactly symmetric (upper triangle mirrored).

    The mirror matters: a matmul need not round (i, j) and (j, i) alike, and the merge loop's
    argmin relies on symmetry to return the pair with i < j first. ``out`` (a B x N x N float32
    view, e.g. the top-left block of the rounds' padded matrix) receives the result, so the
    mirror is also the copy into it (``1 - cos`` is taken in place: two passes, not three).
    The distances carry no gradient: they only choose the (discrete) clusters, and gradients reach
    the tokens through the pooling. Call it with autocast off, as ``ATC.reduce`` runs
    (``ATC.autocast``): under autocast the matmul rounds to the autocast dtype.
    """
    k = keys.detach().float()
    k = k / torch.linalg.vecdot(k, k).sqrt().clamp_min(1e-12).unsqueeze(-1)
    d = k @ k.transpose(1, 2)
    torch.sub(torch.ones((), dtype=d.dtype, device=d.device), d, out=d)  # 1 - cos in place
    n = d.shape[-1]
    upper = torch.ones(n, n, dtype=torch.bool, device=d.device).triu(1)
    return torch.where(upper, d, d.transpose(1, 2), out=torch.empty_like(d) if out is None else out)


def _roots(parent: torch.Tensor, n: int) -> torch.Tensor:
    """Follow parent pointers (flat ids, parent <= id, chains within n ids) to every id's root by pointer jumping."""
    for _ in range(max(1, math.ceil(math.log2(n)))):
        parent = parent[parent]
    return parent


def _numbered(root: torch.Tensor, k: int) -> torch.Tensor:
    """Cluster index of every point from its root (B x N, the cluster's lowest member): roots numbered in order.

    The clamp only matters for NaN or +inf distances, which can leave merges undone (more than k
    roots); it keeps the labels in range, not the partition meaningful.
    """
    n = root.shape[1]
    rank = (root == torch.arange(n, device=root.device)).long().cumsum(dim=1) - 1
    return rank.gather(1, root).clamp_max(k - 1)


def agglomerative_labels(dist: torch.Tensor, k: int, linkage: str = "average") -> torch.Tensor:
    """Cluster index in [0, k) of every point (B x N long) after agglomerating to k clusters.

    dist: B x N x N symmetric distances (the diagonal is ignored), in the dtype the merges run in
    (float32 in the operator; float64 reproduces scipy's arithmetic). Clusters are numbered in
    the order of their lowest member. Eager: :func:`reciprocal_labels` (rounds of reciprocal
    nearest-neighbour merges, one host read per round); inside ``torch.compile``:
    :func:`sequential_labels` (N - k merge steps, no host read, one graph). Both keep the N - k
    lowest merges of the same dendrogram, so they give the same partition unless distances tie.
    """
    if torch.compiler.is_compiling():
        return sequential_labels(dist, k, linkage)
    return reciprocal_labels(dist, k, linkage)


def _first(mask: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    """The indices of each row's True entries (B x W bool), in order, padded with ``pad`` to ``width``."""
    b, w = mask.shape
    position = torch.where(mask, mask.cumsum(dim=1) - 1, width)  # unselected entries go to a spare column
    out = torch.full((b, width + 1), pad, dtype=torch.long, device=mask.device)
    out.scatter_(1, position, torch.arange(w, device=mask.device).expand(b, w))
    return out[:, :width]


def _lance_williams(a: torch.Tensor, b: torch.Tensor, na: torch.Tensor | None, nb: torch.Tensor | None, linkage: str) -> torch.Tensor:
    """Distances of the merged cluster a+b from those of a and b (average: scipy's (n_a d_a + n_b d_b) / (n_a + n_b)).

    +inf (absorbed clusters, padding, the diagonal) stays +inf for average and complete; single's
    callers mask the pair's own columns.
    """
    if linkage == "average":  # no fused multiply-add: scipy rounds each product
        return (na * a).add_(nb * b).div_(na + nb)
    return torch.maximum(a, b) if linkage == "complete" else torch.minimum(a, b)


def _merge_rows(d: torch.Tensor, flat: torch.Tensor, ki: torch.Tensor, kj: torch.Tensor, count: torch.Tensor | None, linkage: str):
    """One round's merges, in place: the Lance-Williams rows of the p merged pairs (B x p, kj into ki)
    written into rows and columns ki of the B x W x W matrix d. flat: the flat row ids of ki then kj
    (``flat_rows`` of the B x 2p index).

    Pairs merged in the same round are combined row, then column, and mirrored (the matrix stays
    exactly symmetric). Returns the member counts of ki and kj (B x p x 1; None unless average).
    """
    b, w, _ = d.shape
    p = ki.shape[1]
    rows = d.view(b * w, w)
    both = rows.index_select(0, flat).view(b, 2 * p, w)
    ni = nj = None
    if count is not None:
        c = count.view(-1).index_select(0, flat).view(b, 2 * p, 1)
        ni, nj = c[:, :p], c[:, p:]
    new = _lance_williams(both[:, :p], both[:, p:], ni, nj, linkage)  # B x p x w: the merged rows
    g = new.gather(2, torch.cat([ki, kj], dim=1).unsqueeze(1).expand(b, p, 2 * p))
    tn = (ni.transpose(1, 2), nj.transpose(1, 2)) if ni is not None else (None, None)
    pair = _lance_williams(g[:, :, :p], g[:, :, p:], tn[0], tn[1], linkage)
    pair = torch.where(torch.ones(p, p, dtype=torch.bool, device=d.device).triu(1), pair, pair.transpose(1, 2))
    pair.diagonal(dim1=1, dim2=2).fill_(math.inf)
    spread = ki.unsqueeze(1)
    new.scatter_(2, spread.expand(b, p, p), pair)
    rows.index_copy_(0, flat.view(b, 2 * p)[:, :p].reshape(-1), new.view(b * p, w))
    d.scatter_(2, spread.expand(b, w, p), new.transpose(1, 2).contiguous())  # a contiguous source scatters faster
    return ni, nj


def _padded(b: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised B x (N+1) x (N+1) matrix with +inf in the last (dummy) row and column: the
    rounds' working matrix, whose top-left N x N block the caller fills with the distances."""
    d = torch.empty(b, n + 1, n + 1, dtype=dtype, device=device)
    d[:, n].fill_(math.inf)
    d[:, :, n].fill_(math.inf)
    return d


def key_labels(keys: torch.Tensor, k: int, linkage: str = "average") -> torch.Tensor:
    """``agglomerative_labels(cosine_distances(keys), k, linkage)``, what ATC runs, without the copy.

    Eager, the distances are written straight into the rounds' padded matrix (the mirror pass is
    the copy); inside ``torch.compile`` the sequential form runs on :func:`cosine_distances`.
    """
    if torch.compiler.is_compiling():
        return sequential_labels(cosine_distances(keys), k, linkage)
    b, n, _ = keys.shape
    d = _padded(b, n, torch.float32, keys.device)
    cosine_distances(keys, out=d[:, :n, :n])
    return _rounds(d, k, linkage)


def reciprocal_labels(dist: torch.Tensor, k: int, linkage: str = "average") -> torch.Tensor:
    """:func:`agglomerative_labels` by rounds of reciprocal-nearest-neighbour merges (eager form).

    For the reducible linkages (average, complete, single), two clusters that are each other's
    nearest neighbour are merged in the dendrogram whatever else is merged first, so a round merges
    every such pair at once (Lance-Williams rows, batched); the dendrogram is the one the
    closest-pair greedy builds. Cutting it at k clusters keeps its N - k lowest merges, which the
    rounds find without building the rest:

    * a merge above the (N - k)-th lowest merge known so far (made, or about to be made this
      round) cannot be among the N - k lowest, so it is not made; a cluster whose nearest
      neighbour is farther than that bound never takes part again (its distances only grow);
    * an image is finished when N - k of its merges lie below the closest remaining pair (every
      later merge is at least that high);
    * only rows whose nearest neighbour merged are re-read (the others keep theirs: a merged
      cluster is never closer than the nearer of its two parts).

    About 4 rounds at keep 0.7 and 6 at 0.5 for 196 tokens (one host read each, sizing the round;
    one more at the end), against N - k steps for :func:`sequential_labels`. Absorbed clusters are masked by +inf added
    before each minimum, not written; padded slots point at a dummy cluster N. Equal heights at the
    cut go to the earlier round, so a merge is kept only with the merges it was built from.
    """
    b, n, _ = dist.shape
    d = _padded(b, n, dist.dtype, dist.device)
    d[:, :n, :n] = dist
    return _rounds(d, k, linkage)


def _rounds(d: torch.Tensor, k: int, linkage: str) -> torch.Tensor:
    """:func:`reciprocal_labels` on its working matrix: B x (N+1) x (N+1) from :func:`_padded`, the
    distances in the top-left block (overwritten: the diagonal set to +inf, merged rows written)."""
    b, w, _ = d.shape
    n = w - 1  # slot n: the dummy that padded slots read and write; never live
    dev, dtype = d.device, d.dtype
    need = n - k
    if need <= 0:
        return torch.arange(n, device=dev).expand(b, n).clone()
    inf = math.inf
    d.diagonal(dim1=1, dim2=2).fill_(inf)
    rows = d.view(b * w, w)
    dead = torch.zeros(b, 1, w, dtype=dtype, device=dev)  # +inf at absorbed clusters (and the dummy)
    dead[:, :, n] = inf
    idx = torch.arange(w, device=dev)
    count = torch.ones(b, w, dtype=dtype, device=dev) if linkage == "average" else None
    height = torch.full((b, w), inf, dtype=dtype, device=dev)  # per cluster index: the height it was absorbed at
    keeper = idx.repeat(b, 1)  # ... and the cluster that absorbed it
    made_in = torch.zeros(b, w, dtype=torch.long, device=dev)  # ... and the round
    nnd, nn = d.min(dim=2)
    nn[:, n] = n
    refreshed = False
    for round_ in range(1, 2 * n + 2):  # each round merges or refreshes; the bound only guards against NaN
        mutual = nn.gather(1, nn) == idx  # dead rows point at the dummy, whose own neighbour is itself
        keep = mutual & (idx < nn)
        bound = torch.where(keep, nnd, height).kthvalue(need, dim=1, keepdim=True).values
        keep &= nnd <= bound
        merged = keep | mutual & keep.gather(1, nn)
        # rows to re-read after the merges: the merged ones and the live ones whose nearest cluster merges
        reread = keep | (nnd <= bound) & ~merged & merged.gather(1, nn)
        p, s = torch.stack([keep.sum(1).max(), reread.sum(1).max()]).tolist()  # the round's host read: its widths
        if p == 0:  # finished when every image has need merges below its closest remaining pair
            if refreshed or bool(((height < nnd.amin(dim=1, keepdim=True)).sum(1) >= need).all()):
                break
            # equal distances can leave a kept neighbour that is not the first: re-read every row once
            nnd, nn = (d + dead).min(dim=2)
            nnd[:, n], nn[:, n] = inf, n
            nn.masked_fill_(nnd == inf, n)
            refreshed = True
            continue
        refreshed = False
        ki = _first(keep, p, n)  # B x p keepers (the lower index of each pair), padded with the dummy
        kj = nn.gather(1, ki)
        ni, nj = _merge_rows(d, flat_rows(torch.cat([ki, kj], dim=1), w), ki, kj, count, linkage)
        dead.scatter_(2, kj.unsqueeze(1), inf)
        if count is not None:
            count.scatter_(1, ki, (ni + nj).squeeze(2))
        height.scatter_(1, kj, nnd.gather(1, ki))
        keeper.scatter_(1, kj, ki)
        made_in.scatter_(1, kj, torch.full_like(kj, round_))
        rs = _first(reread, s, n)
        v, ix = rows.index_select(0, flat_rows(rs, w)).view(b, s, w).add_(dead).min(dim=2)
        nnd = nnd.scatter(1, rs, v).scatter(1, kj, inf)
        nn = nn.scatter(1, rs, ix).scatter(1, kj, torch.full_like(kj, n))  # a tensor: traced int scalars read as sources
        # padded slots wrote the dummy's state (merged it with itself): back to a dead cluster of one
        nnd[:, n], nn[:, n], height[:, n] = inf, n, inf
        if count is not None:
            count[:, n] = 1
    return _cut(height[:, :n], keeper[:, :n], made_in[:, :n], k)


def _cut(height: torch.Tensor, keeper: torch.Tensor, made_in: torch.Tensor, k: int) -> torch.Tensor:
    """Labels from the N - k lowest recorded merges (per absorbed cluster: height, absorber, round; B x N).

    Equal heights go in round order, so a merge is kept only after the merges it was built from.
    """
    b, n = height.shape
    dev = height.device
    by_round = made_in.argsort(dim=1, stable=True)
    low = by_round.gather(1, height.gather(1, by_round).argsort(dim=1, stable=True)[:, : n - k])
    nb = (torch.arange(b, device=dev) * n).unsqueeze(1)
    parent = torch.arange(b * n, device=dev)
    parent[flat_rows(low, n)] = flat_rows(keeper.gather(1, low), n)
    return _numbered(_roots(parent, n).view(b, n) - nb, k)


def sequential_labels(dist: torch.Tensor, k: int, linkage: str = "average") -> torch.Tensor:
    """The sync-free form of :func:`agglomerative_labels`, one merge per step (what a compiled graph runs).

    dist: B x N x N symmetric distances (the diagonal is ignored), in the dtype the merges run in
    (float32 in the operator; float64 reproduces scipy's arithmetic). Clusters are numbered in the order of their lowest member. N - k
    sequential steps of batched work, no host sync, no loop over images; equal distances go to
    the pair first in row-major order (i < j).

    Finding the closest pair by an argmin over the whole matrix costs N^2 per step; instead rows
    are cut into blocks of g ~ sqrt(N / 2) and ``blockmin[b, blk, c]`` keeps the minimum of column c
    over the block's rows (by symmetry: of row c over the block's columns), so the row minima
    are one reduction over blocks. A merge changes only rows and columns i and j: a step
    recomputes the two row blocks holding i and j (one contiguous gather) and writes columns i
    and j of ``blockmin`` from the merged row: O(N sqrt(N)) per step, exact for any linkage.

    Everything is indexed by flat ids ``b * W + index`` (W: N padded to whole blocks), and the
    parent pointers are written once after the loop (an absorbed cluster's row and column are
    +inf, so it is never picked again: each id is absorbed at most once). Inside the loop every
    write is an ``index_put_`` on a flat base tensor (the matrix, the block minima, the counts),
    never through a view: inductor then updates them in place, where writes through views of a
    shared buffer made it copy the whole matrix and its minima every step (O(N^2) a step: the
    compiled operator took 5-9x eager's time on the CPU, now 0.83-1.16x; docs/benchmarks.md). A step is about twenty
    batched ops; eager, at small batches, their fixed cost is most of its time.
    """
    b, n, _ = dist.shape
    dev, dtype = dist.device, dist.dtype
    g = max(1, math.isqrt(max(1, (n - 1) // 2)) + 1)  # block width ~ sqrt(N / 2): a step reads 2 g + N / g rows
    blocks = -(-n // g)
    w = blocks * g  # rows and columns padded with +inf up to whole blocks
    d = torch.full((b, w, w), math.inf, dtype=dtype, device=dev)
    d[:, :n, :n] = dist
    d.diagonal(dim1=1, dim2=2).fill_(math.inf)
    matrix = d.view(-1)  # B*W*W: row r of image b at (b * W + r) * W
    blockmin = d.view(b, blocks, g, w).amin(dim=2).reshape(-1)  # B*blocks*W: [b, blk, c] = min of column c over the block's rows
    count = torch.ones(b * w, dtype=dtype, device=dev)
    base = torch.arange(b, device=dev) * w
    col = torch.arange(w, device=dev)
    image = torch.arange(b, device=dev).view(b, 1, 1)
    matrix_column = image * (w * w) + col.view(1, 1, w) * w  # + c: column c of an image's matrix (B x 1 x W)
    blockmin_column = image * (blocks * w) + torch.arange(blocks, device=dev).view(1, 1, blocks) * w  # + c: of its block minima
    dead = torch.full((b, 1, w), math.inf, dtype=dtype, device=dev)
    absorbed: list[torch.Tensor] = []
    for _ in range(n - k):
        rows_of = matrix.view(b * w, w)  # read-only views, taken afresh each step
        flat_i = blockmin.view(b, blocks, w).amin(dim=1).argmin(dim=1) + base  # first row holding the minimum: i < j
        flat_j = rows_of.index_select(0, flat_i).argmin(dim=1) + base
        flat_ij = torch.stack([flat_i, flat_j], dim=1)  # B x 2
        rows = rows_of.index_select(0, flat_ij.view(-1)).view(b, 2, w)
        pair_counts = count.index_select(0, flat_ij.view(-1)).view(b, 2, 1) if linkage == "average" else None
        counts = (pair_counts[:, :1], pair_counts[:, 1:]) if pair_counts is not None else (None, None)
        merged = _lance_williams(rows[:, :1], rows[:, 1:], *counts, linkage)  # B x 1 x W
        if linkage == "single":  # min(d_ij, inf) at i and j: they are not its neighbours
            merged.scatter_(2, (flat_ij - base.unsqueeze(1)).unsqueeze(1), math.inf)
        out = torch.cat([merged, dead], dim=1).reshape(-1)  # the new rows (and, by symmetry, columns) i and j
        ij = (flat_ij - base.unsqueeze(1)).unsqueeze(2)  # B x 2 x 1: i and j within the image
        matrix.index_put_(((flat_ij.unsqueeze(2) * w + col).view(-1),), out)  # rows i, j
        matrix.index_put_(((matrix_column + ij).view(-1),), out)  # columns i, j
        blockmin.index_put_(((blockmin_column + ij).view(-1),), out.view(b, 2, blocks, g).amin(dim=-1).reshape(-1))
        changed = flat_ij.view(-1) // g  # b * blocks + the row block of i (of j)
        refreshed = matrix.view(b * blocks, g * w).index_select(0, changed).view(2 * b, g, w).amin(dim=1)
        blockmin.index_put_(((changed.unsqueeze(1) * w + col).view(-1),), refreshed.view(-1))
        if linkage == "average":
            count.index_put_((flat_i,), pair_counts.sum(dim=1).view(-1))
        absorbed.append(flat_ij)
    parent = torch.arange(b * w, device=dev)
    if absorbed:  # every cluster is absorbed once, so the parent pointers can be written after the loop
        pairs = torch.stack(absorbed).view(-1, 2)
        parent.index_copy_(0, pairs[:, 1], pairs[:, 0])
    return _numbered(_roots(parent, n).view(b, w)[:, :n] - base.unsqueeze(1), k)


@dataclass(frozen=True)
class ATC(MeanPosition, TokenOperator):
    """Agglomerative Token Clustering of the keys (see the module docstring)."""

    name = "atc"
    summary = "ATC: agglomerative clustering of the keys (cosine, average/complete/single linkage), size-weighted"
    merges = True
    default_prop_attn = True  # ATC's off-the-shelf patch (SSLBackbone_setup apply_patch) defaults to it
    autocast = False  # float32 distances and merges under AMP: bf16's 8 mantissa bits would tie most distances

    linkage: Linkage = "average"

    def needs(self) -> frozenset[str]:
        return frozenset({KEYS})

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        assert ctx.keys is not None, "atc needs the block's keys"
        assignment = key_labels(ctx.keys, k, self.linkage)
        tokens, sizes = pool_by_assignment(x, ctx.sizes, assignment, k)
        return Reduction(tokens, sizes, assignment)
