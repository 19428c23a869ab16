"""`tpool profile` as a library: GMACs per layer for operators x schedules on one model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

from torch import nn

from .flops import FlopReport, count_flops
from .ops import TokenOperator, make_operators
from .patch import patch, unpatch
from .schedule import Schedule


@dataclass
class ProfileResult:
    """GMACs of one (operator, schedule) configuration, with the baseline it is compared to."""

    op: str  # operator label, options included
    schedule: Optional[Schedule]  # None for the unpatched baseline
    report: FlopReport
    baseline_gmacs: float

    @property
    def reduction_pct(self) -> float:
        return 100.0 * (1.0 - self.report.total / self.baseline_gmacs)

    def row(self, model_name: str, img_size: int) -> dict[str, Any]:
        """A plain, JSON-able row with the full configuration and the per-layer breakdown."""
        s = self.schedule
        depth = len(self.report.layers)
        return {
            "model": model_name,
            "op": self.op,
            "keep": s.keep if s else 1.0,
            "layers": list(s.reduction_layers(depth)) if s else [],
            "tokens": list(s.tokens) if s and s.tokens else None,
            "schedule": s.describe(depth) if s else "baseline",
            "img_size": img_size,
            "gmacs": round(self.report.total, 6),
            "baseline_gmacs": round(self.baseline_gmacs, 6),
            "reduction_pct": round(self.reduction_pct, 3),
            "operator_gmacs": round(sum(layer.operator for layer in self.report.layers), 6),
            "params": self.report.params,
            "num_prefix_tokens": self.report.num_prefix,
            "per_layer": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(layer).items()} for layer in self.report.layers],
            "stem_gmacs": round(self.report.stem, 6),
            "head_gmacs": round(self.report.head, 6),
            "uncounted_ops": self.report.uncounted,
        }


def profile_configs(
    model: nn.Module,
    configs: Sequence[tuple[TokenOperator, Schedule]],
    img_size: Optional[int] = None,
    prop_attn: bool = False,
) -> list[ProfileResult]:
    """Baseline first, then one result per (operator, schedule). Leaves the model unpatched."""
    unpatch(model)
    baseline = count_flops(model, img_size)
    results = [ProfileResult("none", None, baseline, baseline.total)]
    try:
        for operator, schedule in configs:
            patch(model, operator, schedule=schedule, prop_attn=prop_attn)
            results.append(ProfileResult(operator.label(), schedule, count_flops(model, img_size), baseline.total))
    finally:
        unpatch(model)
    return results


def build_configs(
    ops: Sequence[str],
    keeps: Optional[Sequence[float]],
    layers: Optional[tuple[int, ...]],
    tokens: Optional[tuple[int, ...]],
    **op_options: Any,
) -> list[tuple[TokenOperator, Schedule]]:
    """The cross product of operators and keep rates (or the one token budget), validated."""
    operators = make_operators(ops, op_options)  # each operator takes the options it has
    if tokens is not None:
        schedules = [Schedule(tokens=tokens, layers=layers)]
    else:
        schedules = [Schedule(keep=keep, layers=layers) for keep in (keeps or (1.0,))]
    return [(op, sched) for op in operators if op.name != "none" for sched in schedules]
