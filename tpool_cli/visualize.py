"""Show which image regions an operator keeps, pools or merges, layer by layer.

The data comes from the patch mechanism itself: ``patch(..., track=True)`` keeps, after every
reduction, the source map (original patch -> index of the current token it belongs to, -1 =
pruned) in ``model.tpool_state.history``, and ``diagnose=True`` records the reconstruction error of
every reduction. :func:`trace_reductions` runs one forward pass with both switched on and returns
those maps per image; nothing here tracks tokens on its own.

Rendering (matplotlib, no pyplot, so no global state and no display needed). Each panel shows the
model's own preprocessed input, de-normalised with the model's mean/std, cropped to the patch grid:

* a group of several original patches that became one token is filled with one colour (``mean``:
  the mean image colour of its patches, so the panel reads like a superpixel picture of what the
  token stands for; ``palette``: a fixed 20-colour palette keyed by the group's first original
  patch, stable across layers while that patch stays in the group, shaded by image brightness);
* a token that still stands for exactly one patch (every kept token of a pruning operator) shows
  the patch's own pixels and is outlined in white;
* pruned patches are greyed out (faded greyscale, so the context stays visible);
* dark lines are drawn between neighbouring patches that belong to different tokens.

Colours depend only on the image and the partition, never on token order, so re-running gives the
same picture.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .data import data_config
from .errors import TpoolError
from .ops import TokenOperator, make_operator
from .patch import patch, unpatch
from .schedule import Schedule

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ColourMode = Literal["mean", "palette"]
COLOUR_MODES: tuple[str, ...] = ("mean", "palette")
FIGURE_FORMATS: tuple[str, ...] = ("png", "svg")

PANEL_INCHES = 2.5  # width of one panel; the title adds a little height
BOUNDARY_COLOUR = (0.05, 0.05, 0.05, 0.85)
SINGLETON_COLOUR = (1.0, 1.0, 1.0, 0.95)
PRUNED_GREY = (0.62, 0.25)  # pruned pixel = base + contrast * (luminance - 0.5): faded greyscale


@dataclass(frozen=True)
class ReductionStep:
    """The partition of the original patches right after one reduction, for one image."""

    layer: int  # 0-indexed block whose operator ran
    tokens_in: int
    tokens_out: int
    source: torch.Tensor  # (N0,) long: current token of each original patch, -1 = pruned
    recon: float  # reconstruction error of this reduction (see recon.py)
    recon_weighted: float  # the same, weighted by significance


@dataclass(frozen=True)
class Trace:
    """What one operator did to one image: the partition after each of its reductions."""

    operator: str  # label, e.g. 'topk' or 'topk(score=received)'
    grid: tuple[int, int]  # (rows, cols) of the original patch grid
    patch_size: tuple[int, int]  # (height, width) of a patch in pixels
    steps: tuple[ReductionStep, ...]


def model_grid(model: nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    """(patch grid rows x cols, patch height x width) of a timm ViT."""
    embed = getattr(model, "patch_embed", None)
    grid = getattr(embed, "grid_size", None)
    size = getattr(embed, "patch_size", None)
    if grid is None or size is None:
        raise TpoolError(f"{type(model).__name__} has no 2D patch grid to draw (need a timm ViT patch_embed)")
    return (int(grid[0]), int(grid[1])), (int(size[0]), int(size[1]))


def trace_reductions(
    model: nn.Module,
    images: torch.Tensor,
    op: str | TokenOperator,
    keep: Optional[float] = None,
    layers: Optional[tuple[int, ...]] = None,
    tokens: Optional[tuple[int, ...]] = None,
    *,
    schedule: Optional[Schedule] = None,
    prop_attn: Optional[bool] = None,
    seed: int = 0,
    **op_options: object,
) -> list[Trace]:
    """Run ``images`` (B x 3 x H x W, preprocessed) through ``model`` with ``op``; one Trace per image.

    Uses the patch mechanism's own source maps (``track=True``) and reconstruction errors
    (``diagnose=True``). The model is left unpatched afterwards.
    """
    grid, patch_size = model_grid(model)
    operator = op if isinstance(op, TokenOperator) else make_operator(op, **op_options)
    patch(model, operator, keep, layers, tokens, schedule=schedule, prop_attn=prop_attn, track=True, diagnose=True, seed=seed)
    try:
        with torch.no_grad():
            model(images)
        state = model.tpool_state
        history = [h.detach().cpu() for h in state.history]
        diagnostics = list(state.diagnostics)
    finally:
        unpatch(model)
    assert len(history) == len(diagnostics), "every reduction records one source map and one diagnostic"
    if history and history[0].shape[1] != grid[0] * grid[1]:
        raise TpoolError(
            f"the images gave {history[0].shape[1]} patches, not the model's {grid[0]}x{grid[1]} grid: "
            "preprocess them at the model's resolution"
        )
    traces = []
    for b in range(images.shape[0]):
        steps = tuple(
            ReductionStep(
                layer=int(d["layer"]),
                tokens_in=int(d["tokens_in"]),
                tokens_out=int(d["tokens_out"]),
                source=src[b].clone(),
                recon=float(d["recon"][b]),
                recon_weighted=float(d["recon_weighted"][b]),
            )
            for src, d in zip(history, diagnostics)
        )
        traces.append(Trace(operator.label(), grid, patch_size, steps))
    return traces


# ----------------------------------------------------------------------------- pixels


def denormalise(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A preprocessed 3 x H x W tensor back to an H x W x 3 float array in [0, 1]."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (image.detach().float().cpu() * s + m).clamp(0.0, 1.0).permute(1, 2, 0).numpy()


def _palette() -> np.ndarray:
    from matplotlib import colormaps

    return np.asarray(colormaps["tab20"].colors, dtype=np.float64)  # 20 x 3


def colour_partition(
    image: np.ndarray, source: torch.Tensor, grid: tuple[int, int], patch_size: tuple[int, int], mode: ColourMode = "mean"
) -> np.ndarray:
    """The panel's pixels: ``image`` (H x W x 3 in [0, 1]) with each patch coloured by its token.

    See the module docstring for the rules. The result is cropped to the patch grid
    (rows * patch height x cols * patch width), the part of the image the model sees.
    """
    if mode not in COLOUR_MODES:
        raise TpoolError(f"unknown colour mode {mode!r}; choose from {', '.join(COLOUR_MODES)}")
    gh, gw = grid
    ph, pw = patch_size
    img = np.asarray(image, dtype=np.float64)[: gh * ph, : gw * pw]
    if img.shape[:2] != (gh * ph, gw * pw):
        raise TpoolError(f"image of {img.shape[1]}x{img.shape[0]} px is smaller than the {gw}x{gh} grid of {pw}x{ph} patches")
    labels = source.cpu().numpy().reshape(gh, gw)
    patches = img.reshape(gh, ph, gw, pw, 3).transpose(0, 2, 1, 3, 4)  # gh x gw x ph x pw x 3 (view)
    luminance = patches @ np.array([0.299, 0.587, 0.114])  # gh x gw x ph x pw
    out = patches.copy()

    kept = labels >= 0
    k = int(labels.max()) + 1 if kept.any() else 1
    sizes = np.bincount(labels[kept], minlength=k)
    group = kept & (sizes[np.where(kept, labels, 0)] > 1)  # patches in a token that stands for several
    if group.any():
        if mode == "mean":
            patch_means = patches.mean(axis=(2, 3))  # gh x gw x 3 (every patch has the same pixel count)
            sums = np.stack([np.bincount(labels[kept], weights=patch_means[kept][:, c], minlength=k) for c in range(3)], 1)
            fill = sums / np.maximum(sizes, 1)[:, None]
            out[group] = fill[labels[group]][:, None, None, :]
        else:
            anchor = np.full(k, gh * gw, dtype=np.int64)  # first original patch (raster order) of each token
            np.minimum.at(anchor, labels[kept], np.flatnonzero(kept.reshape(-1)))
            colour = _palette()[anchor % 20]
            shade = 0.45 + 0.55 * luminance[group][..., None]
            out[group] = colour[labels[group]][:, None, None, :] * shade
    pruned = ~kept
    if pruned.any():
        base, contrast = PRUNED_GREY
        out[pruned] = (base + contrast * (luminance[pruned] - 0.5))[..., None]
    return np.clip(out.transpose(0, 2, 1, 3, 4).reshape(gh * ph, gw * pw, 3), 0.0, 1.0)


def boundary_segments(labels: np.ndarray, patch_size: tuple[int, int]) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Pixel-coordinate line segments between neighbouring patches of different tokens.

    ``labels`` is the gh x gw source map; pruned patches (-1) count as one region, so no lines are
    drawn inside a pruned area, only around it.
    """
    ph, pw = patch_size
    segments = []
    rows, cols = np.nonzero(labels[:, 1:] != labels[:, :-1])  # vertical edges right of column c
    segments += [(((c + 1) * pw, r * ph), ((c + 1) * pw, (r + 1) * ph)) for r, c in zip(rows.tolist(), cols.tolist())]
    rows, cols = np.nonzero(labels[1:, :] != labels[:-1, :])  # horizontal edges below row r
    segments += [((c * pw, (r + 1) * ph), ((c + 1) * pw, (r + 1) * ph)) for r, c in zip(rows.tolist(), cols.tolist())]
    return segments


def singleton_patches(labels: np.ndarray) -> list[tuple[int, int]]:
    """(row, col) of patches whose token stands for that patch alone (kept, not merged)."""
    kept = labels >= 0
    if not kept.any():
        return []
    sizes = np.bincount(labels[kept])
    alone = kept & (sizes[np.where(kept, labels, 0)] == 1)
    return [(int(r), int(c)) for r, c in zip(*np.nonzero(alone))]


# ----------------------------------------------------------------------------- figures


def _draw_panel(
    ax: "Axes", pixels: np.ndarray, labels: Optional[np.ndarray], patch_size: tuple[int, int], title: str
) -> None:
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Rectangle

    h, w = pixels.shape[:2]
    ax.imshow(pixels, extent=(0, w, h, 0), interpolation="nearest")
    ph, pw = patch_size
    cells = max(h // ph, w // pw)
    line = 1.0 if cells <= 16 else max(0.4, 16 / cells)  # thinner lines on finer grids
    if labels is None:  # the input: a faint patch grid
        faint = [((x, 0), (x, h)) for x in range(pw, w, pw)] + [((0, y), (w, y)) for y in range(ph, h, ph)]
        ax.add_collection(LineCollection(faint, colors=[(1, 1, 1, 0.35)], linewidths=0.4 * line))
    else:
        ax.add_collection(LineCollection(boundary_segments(labels, patch_size), colors=[BOUNDARY_COLOUR], linewidths=line))
        for r, c in singleton_patches(labels):
            inset = 0.06 * min(ph, pw)
            ax.add_patch(
                Rectangle((c * pw + inset, r * ph + inset), pw - 2 * inset, ph - 2 * inset, fill=False,
                          edgecolor=SINGLETON_COLOUR, linewidth=line)
            )
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8, linespacing=1.25)


def _step_title(operator: str, step: ReductionStep) -> str:
    return (
        f"{operator} · after block {step.layer}\n"
        f"{step.tokens_in}→{step.tokens_out} tokens · recon {step.recon:.3g} (wtd {step.recon_weighted:.3g})"
    )


def render(
    image: np.ndarray, traces: Sequence[Trace], caption: str = "", colours: ColourMode = "mean", input_panel: bool = True
) -> "Figure":
    """One figure for one image: a row per trace (operator), a column per reduction layer.

    Columns are the union of the layers at which the traces reduced (an operator that did not
    reduce at a layer leaves that cell empty). With ``input_panel`` the first column shows the
    de-normalised input with its patch grid (top row only).
    """
    from matplotlib.figure import Figure

    if not traces:
        raise TpoolError("nothing to draw: no operators given")
    grid, patch_size = traces[0].grid, traces[0].patch_size
    layers = sorted({step.layer for t in traces for step in t.steps})
    first = 1 if input_panel else 0
    ncols = max(1, first + len(layers))
    nrows = len(traces)
    ph, pw = patch_size
    aspect = (grid[0] * ph) / (grid[1] * pw)
    fig = Figure(
        figsize=(PANEL_INCHES * ncols, nrows * (PANEL_INCHES * aspect + 0.45) + (0.3 if caption else 0.0)),
        layout="constrained",
    )
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.03, wspace=0.0, hspace=0.0)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    cropped = np.asarray(image)[: grid[0] * ph, : grid[1] * pw]
    for row, trace in enumerate(traces):
        if input_panel:
            if row == 0:
                _draw_panel(axes[0, 0], cropped, None, patch_size, f"input\n{grid[0] * grid[1]} patches ({grid[0]}x{grid[1]})")
            else:
                axes[row, 0].axis("off")
        by_layer = {step.layer: step for step in trace.steps}
        for col, layer in enumerate(layers, start=first):
            step = by_layer.get(layer)
            if step is None:
                axes[row, col].axis("off")
                axes[row, col].set_title(f"{trace.operator} · block {layer}\nno reduction", fontsize=8)
                continue
            labels = step.source.numpy().reshape(grid)
            pixels = colour_partition(image, step.source, grid, patch_size, colours)
            _draw_panel(axes[row, col], pixels, labels, patch_size, _step_title(trace.operator, step))
        if not trace.steps and not layers:
            axes[row, 0].set_title(f"{trace.operator}: no reduction\n{grid[0] * grid[1]} patches", fontsize=8)
    if caption:
        fig.suptitle(caption, fontsize=9)
    return fig


def save_figure(fig: "Figure", path: Path, dpi: int = 100, compact: bool = False) -> Path:
    """Write ``fig`` (format from the suffix), creating the folder; an unwritable path is a TpoolError.

    ``compact`` (PNG only) stores a 256-colour palette image, 2-3x smaller: photos are what makes
    these PNGs large, and the panels survive an adaptive palette without visible banding.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if compact and path.suffix == ".png":
            from PIL import Image

            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=dpi)
            with Image.open(buf) as img:
                img.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
        else:
            fig.savefig(path, dpi=dpi, metadata={"Software": None} if path.suffix == ".png" else None)
    except OSError as exc:
        raise TpoolError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", text).strip("-") or "x"


def _unique_stems(names: Sequence[str]) -> list[str]:
    """File stems for the images, made unique (a/x.png and b/x.png -> x, x-2)."""
    seen: dict[str, int] = {}
    stems = []
    for name in names:
        stem = _slug(Path(name).stem)
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def visualize(
    model: nn.Module,
    images: torch.Tensor,
    names: Sequence[str],
    ops: Sequence[str | TokenOperator],
    out_dir: str | Path,
    keep: Optional[float] = None,
    layers: Optional[tuple[int, ...]] = None,
    tokens: Optional[tuple[int, ...]] = None,
    *,
    schedule: Optional[Schedule] = None,
    grid: bool = False,
    fmt: str = "png",
    colours: ColourMode = "mean",
    caption: str = "",
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    prop_attn: Optional[bool] = None,
    seed: int = 0,
    dpi: int = 100,
    compact: bool = False,
    op_options: Optional[dict[str, object]] = None,
) -> list[Path]:
    """Trace every operator on ``images`` (preprocessed, B x 3 x H x W) and write the figures.

    One figure per image and operator (``<image>_<op>.<fmt>``), or with ``grid`` one per image
    with a row per operator (``<image>_compare.<fmt>``). The schedule is ``keep``/``layers``/``tokens``
    as for :func:`~tpool_cli.patch.patch`, or a ready ``schedule``. ``mean``/``std`` de-normalise the images
    (default: the model's own preprocessing config). ``caption`` heads every figure (the image
    name is added); ``compact`` writes 256-colour PNGs. Returns the written paths in order.
    """
    if fmt not in FIGURE_FORMATS:
        raise TpoolError(f"unknown figure format {fmt!r}; choose from {', '.join(FIGURE_FORMATS)}")
    if colours not in COLOUR_MODES:
        raise TpoolError(f"unknown colour mode {colours!r}; choose from {', '.join(COLOUR_MODES)}")
    if len(names) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(names)} names")
    if mean is None or std is None:
        config = data_config(model)
        mean, std = config["mean"], config["std"]
    out_dir = Path(out_dir)
    options = op_options or {}
    operators = [op if isinstance(op, TokenOperator) else make_operator(op, **options) for op in ops]
    per_op = [
        trace_reductions(model, images, operator, keep, layers, tokens, schedule=schedule, prop_attn=prop_attn, seed=seed) for operator in operators
    ]
    written = []
    for b, stem in enumerate(_unique_stems(names)):
        pixels = denormalise(images[b], mean, std)
        head = f"{caption} · {names[b]}" if caption else names[b]
        if grid:
            figures = [(f"{stem}_compare", render(pixels, [traces[b] for traces in per_op], head, colours))]
        else:
            figures = [
                (f"{stem}_{_slug(traces[b].operator)}", render(pixels, [traces[b]], head, colours)) for traces in per_op
            ]
        for file_stem, fig in figures:
            written.append(save_figure(fig, out_dir / f"{file_stem}.{fmt}", dpi=dpi, compact=compact))
    return written
