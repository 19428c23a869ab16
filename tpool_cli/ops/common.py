"""Tensor helpers shared by several operators (pure functions)."""

from __future__ import annotations

from typing import Optional

import torch


def flat_rows(index: torch.Tensor, n: int) -> torch.Tensor:
    """Per-image row indices (B x K into N rows each) -> indices into the B*N rows of a flattened batch."""
    offsets = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * n
    return (index + offsets).reshape(-1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: B x N x C, index: B x K -> B x K x C.

    One ``index_select`` of whole rows on the flattened batch: several times faster than a
    ``gather`` with an index expanded over C (on CPU above all), same result.
    """
    b, n, c = x.shape
    return x.reshape(b * n, c).index_select(0, flat_rows(index, n)).view(b, index.shape[1], c)


def keep_by_score(
    x: torch.Tensor, sizes: torch.Tensor, scores: torch.Tensor, k: int, track: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the k highest-scoring tokens, in their original order (so a grid stays ordered).

    Returns (tokens B x K x C, sizes B x K, assignment B x N). Dropped tokens get -1. ``track`` is
    ignored (the assignment is always returned; the argument stays for old callers).
    """
    index = kept_index(scores, k)
    return gather_tokens(x, index), torch.gather(sizes, 1, index), kept_assignment(index, scores.shape[1])


def kept_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B x K, ascending) of the k highest scores."""
    return scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def kept_assignment(index: torch.Tensor, n: int) -> torch.Tensor:
    """Assignment (B x N) of a pruning that keeps ``index`` (B x K) in that order: rank or -1."""
    b, k = index.shape
    rank = torch.arange(k, device=index.device).expand(b, k)
    return torch.full((b, n), -1, dtype=torch.long, device=index.device).scatter_(1, index, rank)


def pool_by_assignment(
    x: torch.Tensor, sizes: torch.Tensor, assignment: torch.Tensor, k: int, weights: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean of the tokens assigned to each of k groups.

    x: B x N x C, sizes: B x N, assignment: B x N in [0, k). ``weights`` (B x N) replaces the sizes
    as averaging weights when given (e.g. attention-weighted fusion); the output sizes are always
    the summed input sizes, so they keep counting original patches. A group with zero total
    weight yields a zero token (callers avoid empty groups). Accumulates in float32.
    """
    b, n, c = x.shape
    w = (sizes if weights is None else weights).float()
    # whole-row index_add_ on the flattened batch (a scatter_add_ with an index expanded over C is ~4x slower on CPU)
    out = torch.zeros(b * k, c, device=x.device, dtype=torch.float32)
    out.index_add_(0, flat_rows(assignment, k), (x.float() * w.unsqueeze(-1)).reshape(b * n, c))
    out = out.view(b, k, c)
    new_sizes = torch.zeros(b, k, device=x.device, dtype=torch.float32).scatter_add_(1, assignment, sizes.float())
    wsum = new_sizes if weights is None else torch.zeros_like(new_sizes).scatter_add_(1, assignment, w)
    tokens = out / wsum.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    return tokens.to(x.dtype), new_sizes


def follow_source(source: Optional[torch.Tensor], assignment: torch.Tensor) -> torch.Tensor:
    """Source map after a reduction: for each original patch (B x N0), its token now (-1 = dropped).

    ``source`` None means the identity (no reduction yet). ToMe's ``merge_source``, as an index.
    """
    if source is None:
        return assignment.contiguous()
    return torch.where(source >= 0, assignment.gather(1, source.clamp_min(0)), source)


def replay_mean(values: torch.Tensor, weights: torch.Tensor, assignment: torch.Tensor, k: int) -> torch.Tensor:
    """A per-token side tensor (B x N x D) through a reduction: the ``weights``-weighted mean of each
    output's members (dropped tokens, -1, are ignored). For a pruning it is the kept token's value."""
    b, n, d = values.shape
    bucket = torch.where(assignment >= 0, assignment, k)  # dropped tokens land in a spare bucket k
    wsum = torch.zeros(b, k + 1, device=values.device, dtype=torch.float32).scatter_add_(1, bucket, weights.float())
    # normalise per member first: a group of one gets weight exactly 1, so a kept value comes back unchanged
    w = weights.float() / wsum.gather(1, bucket).clamp_min(torch.finfo(torch.float32).tiny)
    total = torch.zeros(b * (k + 1), d, device=values.device, dtype=torch.float32)
    total.index_add_(0, flat_rows(bucket, k + 1), (values.float() * w.unsqueeze(-1)).reshape(b * n, d))
    return total.view(b, k + 1, d)[:, :k].to(values.dtype)


def replay_take(values: torch.Tensor, representative: torch.Tensor) -> torch.Tensor:
    """A per-token side tensor (B x N x D) through a reduction: each output takes its representative's value."""
    return gather_tokens(values, representative)


def nearest_member(values: torch.Tensor, assignment: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """For each of the K groups, the input index (B x K) of the member nearest to the group's center.

    values: B x N x D, assignment: B x N (-1 = dropped, never chosen), centers: B x K x D. Ties go
    to the lowest index; an empty group gets index 0.
    """
    b, n, _ = values.shape
    k = centers.shape[1]
    bucket = torch.where(assignment >= 0, assignment, k)
    padded = torch.cat([centers.float(), torch.zeros_like(centers[:, :1]).float()], dim=1)
    diff = values.float() - gather_tokens(padded, bucket)
    cost = torch.where(assignment >= 0, torch.linalg.vecdot(diff, diff), float("inf"))
    best = torch.full((b, k + 1), float("inf"), device=values.device).scatter_reduce(1, bucket, cost, reduce="amin")
    index = torch.arange(n, device=values.device).expand(b, n)
    candidate = torch.where(cost <= best.gather(1, bucket), index, n)
    chosen = torch.full((b, k + 1), n, device=values.device, dtype=torch.long).scatter_reduce(1, bucket, candidate, reduce="amin")
    return torch.where(chosen[:, :k] < n, chosen[:, :k], 0)


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x_i - y_k||^2 for x: B x N x C, y: B x K x C -> B x N x K, as one matmul in float32.

    Uses ||x||^2 + ||y||^2 - 2 x.y (K x N x C MACs, no B x N x K x C intermediate), clamped at 0
    against rounding.
    """
    x32, y32 = x.float(), y.float()
    # squared norms as row-wise dot products: one fused op, counted by the FLOP handles (flops.py)
    x_sq, y_sq = torch.linalg.vecdot(x32, x32), torch.linalg.vecdot(y32, y32)
    d = x_sq.unsqueeze(-1) + y_sq.unsqueeze(1) - 2.0 * (x32 @ y32.transpose(1, 2))
    return d.clamp_min_(0.0)


_MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """x * c mod 2**32 for 0 <= x < 2**32, without ever leaving int64 (split into 16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _MASK32


def hash32(x):
    """A bijective 32-bit integer mix (Wellons' "lowbias32"), for Python ints and int64 tensors alike.

    Exact integer arithmetic, so eager, compiled, CPU and CUDA runs give the same bits.
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_uniform(seed: int, b: int, n: int, device: torch.device) -> torch.Tensor:
    """B x N pseudo-random floats in [0, 1) (24 bits each), a pure function of (seed, row, column).

    Counter-based rather than drawn from a ``torch.Generator``: no generator state to carry through
    the forward, which ``torch.compile(fullgraph=True)`` cannot trace, and no dependence on how
    many forwards ran before. Every element's counter b * N + n is distinct and the mix is a
    bijection, so distinct elements get distinct 32-bit values.
    """
    counter = torch.arange(b * n, device=device, dtype=torch.int64).view(b, n)
    bits = hash32(counter ^ hash32(seed))
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


def pool_attention(
    attn: torch.Tensor, assignment: torch.Tensor, weights: torch.Tensor, k: int, num_prefix: int
) -> torch.Tensor:
    """An attention matrix through a reduction of its tokens (MCTF's one-step-ahead reuse).

    attn: B x H x T x T softmax weights over ``[prefix, patches]`` (T = P + N); assignment: B x N
    (output index, -1 dropped); weights: B x N, the weights of the reduction's means. Returns
    B x H x (P + k) x (P + k): the columns of a group summed (the attention a query pays to all its
    members, which is what proportional attention over the fused token gives), then the rows of a
    group averaged with ``weights`` (a fused token queries as the weighted mean of its members'
    queries), as the reference's ``merge_wavg(one_step_ahead=1)`` does with ``merge(mode="sum")``.
    Prefix rows and columns pass unchanged; dropped tokens' rows and columns are discarded.
    Accumulates in float32, returns ``attn``'s dtype.
    """
    b, h, t, _ = attn.shape
    p = num_prefix
    bucket = torch.where(assignment >= 0, assignment, k) + p  # dropped tokens land in a spare slot P + k
    index = torch.cat([torch.arange(p, device=attn.device).expand(b, p), bucket], dim=1)  # B x T in [0, P + k]
    a = attn.float()
    cols = torch.zeros(b, h, t, p + k + 1, device=attn.device).scatter_add_(-1, index[:, None, None, :].expand(b, h, t, t), a)
    cols = cols[..., : p + k]
    w = torch.cat([torch.ones(b, p, device=attn.device), weights.float()], dim=1)
    wsum = torch.zeros(b, p + k + 1, device=attn.device).scatter_add_(1, index, w)
    rows = torch.zeros(b, h, p + k + 1, p + k, device=attn.device)
    rows.scatter_add_(2, index[:, None, :, None].expand(b, h, t, p + k), cols * w[:, None, :, None])
    rows = rows / wsum.clamp_min(torch.finfo(torch.float32).tiny)[:, None, :, None]
    return rows[:, :, : p + k].to(attn.dtype)
