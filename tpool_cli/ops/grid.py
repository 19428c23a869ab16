"""Grid pooling: content-blind 2D average pooling over the patch grid (the seed's baseline).

A rows x cols grid is cut into r' x c' cells by splitting rows and columns into contiguous,
near-equal groups (sizes differ by at most one). Every patch belongs to exactly one cell, so the
cells partition the grid and sizes add up. The output is the size-weighted mean of each cell, in
raster order, and still forms a grid, so grid pooling can be applied again at a later block.
A target K is realised as the largest r' x c' <= K that keeps the aspect ratio as far as possible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import TpoolError
from .base import MeanPosition, ReduceContext, Reduction, TokenOperator
from .common import pool_by_assignment


def grid_shape_for(rows: int, cols: int, k: int) -> tuple[int, int]:
    """Largest (r, c) with r <= rows, c <= cols, r * c <= k, close to the input aspect ratio."""
    scale = math.sqrt(min(k, rows * cols) / (rows * cols))
    r = max(1, min(rows, math.floor(rows * scale + 1e-9)))
    c = max(1, min(cols, math.floor(cols * scale + 1e-9)))
    while True:  # grow the relatively smaller side while the budget allows
        grow_r = r < rows and (r + 1) * c <= k
        grow_c = c < cols and r * (c + 1) <= k
        if grow_r and (not grow_c or r / rows <= c / cols):
            r += 1
        elif grow_c:
            c += 1
        else:
            return r, c


def grid_cells(rows: int, cols: int, out_rows: int, out_cols: int, device: torch.device) -> torch.Tensor:
    """Cell index (raster order) of each patch of a rows x cols grid cut into out_rows x out_cols.

    Computed on ``device`` (a few tiny kernels) rather than copied there from a cached CPU tensor:
    a host-to-device copy from pageable memory synchronises the stream, in every forward.
    """
    row_group = torch.div(torch.arange(rows, device=device) * out_rows, rows, rounding_mode="floor")
    col_group = torch.div(torch.arange(cols, device=device) * out_cols, cols, rounding_mode="floor")
    return (row_group[:, None] * out_cols + col_group[None, :]).reshape(-1)


@dataclass(frozen=True)
class GridPool(MeanPosition, TokenOperator):
    name = "grid"
    summary = "2D average pooling over the patch grid (content-blind)"
    merges = True

    def realise(self, n: int, k: int, grid: Optional[tuple[int, int]]) -> int:
        if grid is None or grid[0] * grid[1] != n:
            raise TpoolError("grid pooling needs the patch tokens on a 2D grid, and these tokens no longer form one")
        r, c = grid_shape_for(grid[0], grid[1], k)
        return r * c

    def output_grid(self, n: int, k: int, grid: Optional[tuple[int, int]]) -> Optional[tuple[int, int]]:
        assert grid is not None
        return grid_shape_for(grid[0], grid[1], k)

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        assert ctx.grid is not None
        out_rows, out_cols = grid_shape_for(ctx.grid[0], ctx.grid[1], k)
        cells = grid_cells(ctx.grid[0], ctx.grid[1], out_rows, out_cols, x.device).expand(x.shape[0], -1)
        tokens, sizes = pool_by_assignment(x, ctx.sizes, cells, out_rows * out_cols)
        return Reduction(tokens, sizes, cells, grid=(out_rows, out_cols))
