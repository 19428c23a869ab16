"""Rotary embeddings of reduced tokens: rows of the full grid, or the embedding at any position.

The ``Eva`` model hands every block the rope of the full patch grid: ``cat([sin, cos])`` along the
last dimension, N0 x 2D (one table for all heads), or H x N0 x 2D for mixed rope (one per block).
After a reduction a token's rope is either

* the row of one original patch (:func:`gather_rope`): a kept token, a medoid, ToMe's
  destination, exactly timm's own numbers (its patch dropout gathers the same way), or
* the embedding at a fractional position (:func:`rope_at_positions`): a token that stands for the
  size-weighted mean of its members' positions.

Why the second is exact for every timm rope (``RotaryEmbeddingCat`` with or without
``ref_feat_shape``, ``RotaryEmbeddingMixed``, ``RotaryEmbeddingDinoV3``, their coordinate
augmentations included): each of them computes sin and cos of an angle that is *affine* in the
patch's (row, col) index, channel by channel (the grid coordinates are affine in the index:
``index * scale + offset`` or DINOv3's centred ``2 (index + 0.5) / size - 1``; the angle is
coordinate x frequency). Reading the table at patch (0, 0) and along the first row and column
gives each channel's angle at the origin and its step per column and per row, and so its angle at
any (row, col). A step is read modulo 2 pi, so this holds when every channel turns by less than pi
per patch: true of these ropes at their trained grids (temperature bands turn by at most 1 rad x
the ``ref_feat_shape`` scale per patch, DINOv3's by 4 pi / grid side, mixed rope's initial
frequencies by at most 1 rad). :func:`affine_rope_problem` checks a model's table and its
frequencies at patch time, and the patch falls back to the nearest member's row where it fails
(logged); running EVA-02 far below its ``ref_feat_shape`` is such a case.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

# a step this close to pi per patch may be an aliased faster rotation: not trusted
MAX_STEP = 0.9 * math.pi
# reconstruction error at the integer grid above which a table is not affine in the patch index
MAX_ERROR = 1e-3


def gather_rope(rope: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    """Rope rows of the current tokens: ``rope`` (N0 x d, or H x N0 x d for mixed rope) at ``index`` (B x N).

    Returns a tensor that broadcasts against B x H x N x d (B x 1 x N x d, or B x H x N x d);
    ``index`` None (nothing reduced yet) returns ``rope`` unchanged.
    """
    if index is None:
        return rope
    rows = rope.index_select(-2, index.reshape(-1)).unflatten(-2, index.shape)  # (..., B, N, d)
    rows = rows.movedim(-3, 0)
    return rows.unsqueeze(1) if rows.dim() == 3 else rows


def _wrap(angle: torch.Tensor) -> torch.Tensor:
    """An angle difference brought into (-pi, pi]."""
    return torch.atan2(angle.sin(), angle.cos())


def rope_field(rope: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(angle at patch (0, 0), step per row, step per column), each (..., D), of a rope table (..., N0, 2D).

    Reads five rows of the table only (the origin, its two neighbours and the far end of each
    axis): this runs in every block after a mean merge.
    """
    rows, cols = grid
    needed = [0, min(1, cols - 1), cols - 1, min(cols, (rows - 1) * cols), (rows - 1) * cols]
    sin, cos = rope.index_select(-2, torch.tensor(needed, device=rope.device)).float().tensor_split(2, -1)
    angle = dict(zip(needed, torch.atan2(sin, cos).unbind(-2)))  # each channel's angle modulo 2 pi
    origin = angle[0]
    return origin, _step(angle, origin, cols, rows - 1), _step(angle, origin, 1, cols - 1)


def _step(angle: dict[int, torch.Tensor], origin: torch.Tensor, stride: int, far: int) -> torch.Tensor:
    """Each channel's angle step along one axis (``stride`` table rows per patch, ``far`` + 1 patches).

    Read first between the first two patches, then refined at the axis's last patch (the wrapped
    gap between where the first step predicts it and where it is, spread over ``far`` steps): the
    error of a step from two neighbours (about twice the table's rounding, 4e-3 rad in bf16)
    would otherwise grow with the distance from the origin; refined, it shrinks with it.
    """
    if far < 1:
        return torch.zeros_like(origin)
    step = _wrap(angle[stride] - origin)
    if far > 1:
        step = step + _wrap(angle[far * stride] - origin - far * step) / far
    return step


def rope_at_positions(rope: torch.Tensor, positions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The rope of tokens at (row, col) ``positions`` (B x N x 2, patch units, may be fractional).

    ``rope`` is the block's full-grid table (N0 x 2D or H x N0 x 2D) on a ``grid`` of rows x cols.
    Returns B x 1 x N x 2D (or B x H x N x 2D), in the table's dtype, laid out as the table.
    """
    origin, per_row, per_col = rope_field(rope, grid)  # (..., D)
    lead = origin.dim() - 1  # 0, or 1 for per-head tables
    shape = (positions.shape[0],) + (1,) * lead + (positions.shape[1], 1)
    row = positions[..., 0].float().reshape(shape)
    col = positions[..., 1].float().reshape(shape)
    angle = origin.unsqueeze(-2) + row * per_row.unsqueeze(-2) + col * per_col.unsqueeze(-2)  # B x (H x) N x D
    out = torch.cat([angle.sin(), angle.cos()], dim=-1).to(rope.dtype)
    return out.unsqueeze(1) if lead == 0 else out


def _coordinate_steps(rope: nn.Module, grid: tuple[int, int]) -> Optional[float]:
    """The largest change of a grid coordinate per patch in ``rope``'s coordinate units, None if unknown."""
    kind = getattr(rope, "grid_type", "centered" if hasattr(rope, "periods") else "index")
    if kind == "index":
        per = 1.0
    elif kind == "pixel":  # linspace(-1, 1, size)
        per = 2.0 / max(1, min(grid) - 1)
    elif kind == "centered":  # 2 (index + 0.5) / d - 1, d by normalize_coords
        d = {"separate": min(grid), "min": min(grid), "max": max(grid)}.get(getattr(rope, "normalize_coords", "separate"))
        if d is None:
            return None
        per = 2.0 / d
    else:
        return None
    ref = getattr(rope, "ref_feat_shape", None)
    if ref is not None:  # EVA's rescaling: coordinate x ref / feat (either axis order)
        per *= max(max(r / f for r, f in zip(ref, grid)), max(r / f for r, f in zip(ref, grid[::-1])))
    if getattr(rope, "aug_active", False):  # training-time jitter and rescale stretch the coordinates
        per *= float(getattr(rope, "jitter_coords", None) or 1.0) * float(getattr(rope, "rescale_coords", None) or 1.0)
    return per


def rope_step_bound(rope: nn.Module, grid: tuple[int, int]) -> Optional[float]:
    """The most any channel of ``rope`` turns per patch on ``grid`` (rad), from the module's own frequencies.

    The table alone cannot tell a step s from s - 2 pi (both rebuild it exactly at the patches), so
    the bound comes from what the module multiplies coordinates by: ``bands`` (axial rope),
    ``freqs`` (mixed rope, per block and head), 2 pi / ``periods`` (DINOv3). None for a rope
    module tpool does not know.
    """
    per = _coordinate_steps(rope, grid)
    if per is None:
        return None
    if isinstance(getattr(rope, "bands", None), torch.Tensor):
        frequency = rope.bands.detach().float().abs().max()
    elif isinstance(getattr(rope, "freqs", None), torch.Tensor):
        frequency = rope.freqs.detach().float().abs().max()
    elif isinstance(getattr(rope, "periods", None), torch.Tensor):
        frequency = 2 * math.pi / rope.periods.detach().float().abs().min()
    else:
        return None
    return float(frequency) * per


def affine_rope_problem(model: nn.Module, grid: Optional[tuple[int, int]]) -> Optional[str]:
    """Why the rope of ``model`` cannot be evaluated between patches (None when it can).

    Rebuilds the model's full-grid table (without coordinate augmentation) and checks that the
    affine reading of :func:`rope_field` reproduces it at every patch, and, from the module's own
    frequencies (:func:`rope_step_bound`, augmentation's stretch included), that no channel turns
    by 0.9 pi or more per patch: the table alone cannot show that.
    """
    rope = getattr(model, "rope", None)
    if rope is None or grid is None:
        return "the model has no rope module or no patch grid"
    was_training = rope.training
    try:
        rope.train(False)
        with torch.no_grad():
            table = rope.get_embed() if getattr(rope, "feat_shape", None) is not None else rope.get_embed(shape=list(grid))
    except Exception as exc:  # an unknown rope module: its rows are still used, between patches is not evaluated
        return f"its rope table could not be rebuilt ({type(exc).__name__}: {exc})"
    finally:
        rope.train(was_training)
    if not isinstance(table, torch.Tensor) or table.shape[-2] != grid[0] * grid[1]:
        return "its rope table does not have one row per patch of the grid"
    if table.device.type == "meta":  # shapes only (tpool models, FLOP counts): nothing to check, nothing computed
        return None
    table = table.float()
    bound = rope_step_bound(rope, grid)
    if bound is None:
        return f"its rope module ({type(rope).__name__}) has no frequencies tpool knows how to bound"
    _, per_row, per_col = rope_field(table, grid)
    if max(bound, per_row.abs().max().item(), per_col.abs().max().item()) > MAX_STEP:
        return "a rope channel turns by nearly pi or more per patch (its angle between patches is ambiguous)"
    i = torch.arange(grid[0] * grid[1])
    integer = torch.stack([torch.div(i, grid[1], rounding_mode="floor"), i % grid[1]], dim=-1).float().unsqueeze(0)
    rebuilt = rope_at_positions(table, integer, grid)
    rebuilt = rebuilt[0, 0] if table.dim() == 2 else rebuilt[0]
    error = (rebuilt - table).abs().max().item()
    if error > MAX_ERROR:
        return f"its rope is not affine in the patch position (max error {error:.2g} at the grid)"
    return None
