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
    x: torch.Tensor, sizes: torch.Tensor, scores: torch.Tensor, k: int, track: bool
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Keep the k highest-scoring tokens, in their original order (so a grid stays ordered).

    Returns (tokens B x K x C, sizes B x K, assignment B x N or None). Dropped tokens get -1.
    """
    index = scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
    assignment = None
    if track:
        assignment = torch.full(scores.shape, -1, dtype=torch.long, device=x.device)
        rank = torch.arange(k, device=x.device).expand(x.shape[0], k)
        assignment.scatter_(1, index, rank)
    return gather_tokens(x, index), torch.gather(sizes, 1, index), assignment


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
