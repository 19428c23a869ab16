"""`tpool recon` as a library: the reconstruction error each operator leaves, per reducing layer.

Token Pooling chooses its K tokens to minimise the (asymmetric Chamfer) reconstruction error of the
N tokens it replaces (see :mod:`tpool_cli.recon`). This module runs a batch of images through a
model patched with each (operator, schedule) with ``diagnose=True`` and averages the recorded
errors over the images, so operators can be compared on the quantity the seed paper optimises.
At the first reducing layer every operator sees exactly the same tokens, so that row is a direct
comparison; later rows compare operators on the tokens their own earlier reductions left.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .data import images_in_folder, load_images
from .errors import TpoolError
from .ops import TokenOperator
from .patch import patch, unpatch
from .schedule import Schedule


@torch.no_grad()
def reconstruction_rows(
    model: nn.Module,
    images: torch.Tensor,
    configs: Sequence[tuple[TokenOperator, Schedule]],
    batch_size: int = 16,
    prop_attn: Optional[bool] = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per (operator, schedule, reducing layer): tokens in/out and the mean errors.

    ``images``: N x 3 x H x W, already transformed for the model; they are moved to the model's
    device in chunks of ``batch_size``. ``recon`` is the size-weighted mean squared distance of each
    input token to its nearest output token, ``recon_weighted`` the same weighted by significance
    x size (both per original patch; averaged over the images). Leaves the model unpatched.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise TpoolError(f"expected a non-empty batch of images N x 3 x H x W, got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise TpoolError(f"--batch-size must be >= 1, got {batch_size}")
    param = next(model.parameters())
    depth = len(model.blocks)
    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    try:
        for operator, schedule in configs:
            patch(model, operator, schedule=schedule, prop_attn=prop_attn, diagnose=True, seed=seed)
            sums: dict[int, dict[str, Any]] = {}
            for chunk in images.split(batch_size):
                model(chunk.to(device=param.device, dtype=param.dtype))
                for record in model.tpool_state.diagnostics:
                    acc = sums.setdefault(
                        record["layer"],
                        {"tokens_in": record["tokens_in"], "tokens_out": record["tokens_out"], "recon": 0.0, "recon_weighted": 0.0},
                    )
                    acc["recon"] += float(record["recon"].double().sum())
                    acc["recon_weighted"] += float(record["recon_weighted"].double().sum())
            for layer in sorted(sums):
                acc = sums[layer]
                rows.append(
                    {
                        "op": operator.label(),
                        "schedule": schedule.describe(depth),
                        "layer": layer,
                        "tokens_in": acc["tokens_in"],
                        "tokens_out": acc["tokens_out"],
                        "recon": acc["recon"] / images.shape[0],
                        "recon_weighted": acc["recon_weighted"] / images.shape[0],
                        "images": int(images.shape[0]),
                    }
                )
    finally:
        unpatch(model)
        model.train(was_training)
    return rows


def reconstruction_on_folder(
    model: nn.Module,
    folder: Path,
    configs: Sequence[tuple[TokenOperator, Schedule]],
    limit: int = 16,
    batch_size: int = 16,
    prop_attn: Optional[bool] = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """:func:`reconstruction_rows` on the first ``limit`` images of an image folder (any depth, sorted)."""
    if limit < 1:
        raise TpoolError(f"--limit must be >= 1, got {limit}")
    images, _ = load_images(images_in_folder(folder, limit), model)
    return reconstruction_rows(model, images, configs, batch_size=batch_size, prop_attn=prop_attn, seed=seed)
