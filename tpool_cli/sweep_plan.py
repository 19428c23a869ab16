"""What a sweep evaluates: its points (operator x schedule, baseline first) and the checks on them.

Kept apart from :mod:`tpool_cli.sweep` (which runs the points) so that :mod:`tpool_cli.sweep_bench`
can name a point without importing the sweep, and so the policy of a sweep (which keep rates by
default, a schedule the model cannot take) is decided here, not in the command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch import nn

from .demo import DEMO_KEEPS
from .errors import TpoolError
from .finetune import FinetuneSettings
from .ops import TokenOperator
from .patch import patch, unpatch
from .profile import build_configs
from .schedule import Schedule

DEFAULT_KEEPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


@dataclass(frozen=True)
class Point:
    """One configuration of the sweep; ``operator`` None is the unpatched baseline.

    ``finetune``: the point is evaluated after fine-tuning the model with its operator in place
    (``tpool pareto --finetune-epochs``, :mod:`tpool_cli.sweep_finetune`); None: off the shelf."""

    operator: Optional[TokenOperator] = None
    schedule: Optional[Schedule] = None
    finetune: Optional[FinetuneSettings] = None

    @property
    def is_baseline(self) -> bool:
        return self.operator is None

    def label(self, depth: int) -> str:
        if self.operator is None or self.schedule is None:
            return "baseline"
        tail = f" +ft {self.finetune.epochs} ep" if self.finetune is not None else ""
        return f"{self.operator.label()} {self.schedule.describe(depth)}{tail}"

    def apply(self, model: nn.Module, prop_attn: Optional[bool] = None, seed: int = 0) -> None:
        """Patch ``model`` for this point (or restore the plain model for the baseline)."""
        if self.operator is None:
            unpatch(model)
        else:
            patch(model, self.operator, schedule=self.schedule, prop_attn=prop_attn, seed=seed)


def sweep_keeps(
    keeps: Optional[Sequence[float]], tokens: Optional[tuple[int, ...]], demo: bool = False,
    rs: Optional[Sequence[tuple[int, ...]]] = None,
) -> Optional[tuple[float, ...]]:
    """The keep rates a sweep runs: the ones given, none under a token budget or r schedules, else the defaults.

    The built-in demo's defaults (:data:`DEMO_KEEPS`) go further down than ImageNet's.
    """
    if keeps is not None and tokens is not None:
        raise TpoolError("give --keep or --tokens, not both")
    if keeps is not None:
        return tuple(keeps)
    if tokens is not None or rs is not None:
        return None
    return DEMO_KEEPS if demo else DEFAULT_KEEPS


def plan_points(
    ops: Sequence[str],
    keeps: Optional[Sequence[float]] = DEFAULT_KEEPS,
    layers: Optional[tuple[int, ...]] = None,
    tokens: Optional[tuple[int, ...]] = None,
    rs: Optional[Sequence[tuple[int, ...]]] = None,
    **op_options: Any,
) -> list[Point]:
    """The baseline first, then every operator x schedule. Keep rate 1.0 never reduces, so it is
    the baseline itself and not evaluated again; repeated points are dropped."""
    points = [Point()]
    for operator, schedule in build_configs(ops, keeps, layers, tokens, rs, **op_options):
        point = Point(operator, schedule)
        if not schedule.is_identity and point not in points:
            points.append(point)
    return points


def validate_points(points: Sequence[Point], model: nn.Module) -> None:
    """Check every point's schedule against ``model`` (layers in range, budgets within the patches),
    so a bad schedule fails before anything is evaluated or written."""
    for point in points:
        if point.schedule is not None:
            point.schedule.validate(len(model.blocks), model.patch_embed.num_patches)
