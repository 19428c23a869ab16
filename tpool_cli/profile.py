"""`tpool profile` as a library: GMACs per layer for operators x schedules on one model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

from torch import nn

from .errors import TpoolError
from .flops import COUNTERS, Agreement, FlopReport, compare_reports, count_flops
from .ops import TokenOperator, make_operators
from .patch import patch, unpatch
from .schedule import Schedule

PROFILE_COUNTERS = (*COUNTERS, "both")
COLUMNS = ("attention", "mlp", "operator", "other")  # per block; they sum to the block's total
EXACT = 9  # decimals of GMACs that hold every count exactly (1 MAC = 1e-9 GMACs)


def _exact(value: float) -> float:
    return round(value, EXACT)


@dataclass
class ProfileResult:
    """GMACs of one (operator, schedule) configuration, with the baseline it is compared to.

    ``agreement`` is set when both counters ran: ``report`` is fvcore's, the agreement holds both.
    """

    op: str  # operator label, options included
    schedule: Optional[Schedule]  # None for the unpatched baseline
    report: FlopReport
    baseline_gmacs: float
    agreement: Optional[Agreement] = None

    @property
    def reduction_pct(self) -> float:
        return 100.0 * (1.0 - self.report.total / self.baseline_gmacs)

    def row(self, model_name: str, img_size: int) -> dict[str, Any]:
        """A plain, JSON-able row with the full configuration and the per-layer breakdown.

        GMAC figures are exact MAC counts (9 decimals), so the parts sum to the totals: per block
        attention + mlp + operator + other = total; over the model, the ``*_gmacs`` block columns
        + stem + head = gmacs.
        """
        s, rep = self.schedule, self.report
        depth = len(rep.layers)
        row: dict[str, Any] = {
            "model": model_name,
            "op": self.op,
            "keep": s.keep if s else 1.0,
            "layers": list(s.reduction_layers(depth)) if s else [],
            "tokens": list(s.tokens) if s and s.tokens else None,
            **({"r": list(s.r)} if s and s.r else {}),
            "schedule": s.describe(depth) if s else "baseline",
            "img_size": img_size,
            "counter": rep.counter,
            "gmacs": _exact(rep.total),
            "baseline_gmacs": _exact(self.baseline_gmacs),
            "reduction_pct": round(self.reduction_pct, 3),
        }
        for column in COLUMNS:
            row[f"{column}_gmacs"] = _exact(sum(getattr(layer, column) for layer in rep.layers))
        row.update(
            stem_gmacs=_exact(rep.stem),
            head_gmacs=_exact(rep.head),
            params=rep.params,
            num_prefix_tokens=rep.num_prefix,
            per_layer=[{k: (_exact(v) if isinstance(v, float) else v) for k, v in asdict(layer).items()} for layer in rep.layers],
            uncounted_ops=rep.uncounted,
        )
        if self.agreement is not None:
            torch_report = self.agreement.reports[1]
            row.update(
                torch_gmacs=_exact(torch_report.total),
                counters_max_rel_diff=self.agreement.max_rel_diff,
                counters_max_diff_at=self.agreement.where,
                torch_uncounted_ops=torch_report.uncounted,
            )
        return row


def _count(model: nn.Module, img_size: Optional[int], counter: str) -> tuple[FlopReport, Optional[Agreement]]:
    if counter not in PROFILE_COUNTERS:
        raise TpoolError(f"unknown --counter {counter!r}; choose from {', '.join(PROFILE_COUNTERS)}")
    if counter != "both":
        return count_flops(model, img_size, counter), None  # type: ignore[arg-type]
    agreement = compare_reports(count_flops(model, img_size, "fvcore"), count_flops(model, img_size, "torch"))
    return agreement.reports[0], agreement


def profile_configs(
    model: nn.Module,
    configs: Sequence[tuple[TokenOperator, Schedule]],
    img_size: Optional[int] = None,
    prop_attn: Optional[bool] = None,
    counter: str = "fvcore",
) -> list[ProfileResult]:
    """Baseline first, then one result per (operator, schedule). Leaves the model unpatched.

    ``counter``: "fvcore", "torch", or "both" (fvcore's report, with the agreement of the two).
    """
    unpatch(model)
    baseline, agreement = _count(model, img_size, counter)
    results = [ProfileResult("none", None, baseline, baseline.total, agreement)]
    try:
        for operator, schedule in configs:
            patch(model, operator, schedule=schedule, prop_attn=prop_attn)
            report, agreement = _count(model, img_size, counter)
            results.append(ProfileResult(operator.label(), schedule, report, baseline.total, agreement))
    finally:
        unpatch(model)
    return results


def build_configs(
    ops: Sequence[str],
    keeps: Optional[Sequence[float]],
    layers: Optional[tuple[int, ...]],
    tokens: Optional[tuple[int, ...]],
    rs: Optional[Sequence[tuple[int, ...]]] = None,
    **op_options: Any,
) -> list[tuple[TokenOperator, Schedule]]:
    """The cross product of operators and keep rates (or r schedules, or the one token budget), validated."""
    operators = make_operators(ops, op_options)  # each operator takes the options it has
    if rs is not None:
        schedules = [Schedule(r=r) for r in rs]
    elif tokens is not None:
        schedules = [Schedule(tokens=tokens, layers=layers)]
    else:
        schedules = [Schedule(keep=keep, layers=layers) for keep in (keeps or (1.0,))]
    return [(op, sched) for op in operators if op.name != "none" for sched in schedules]


def rounded_parts(parts: Sequence[float], decimals: int = 4) -> list[float]:
    """Round GMAC parts for display so that the rounded parts sum to the rounded total.

    Largest-remainder rounding on exact MAC counts: each part moves by less than one unit of the
    last shown decimal, and the parts still add up on screen.
    """
    unit = 10 ** (EXACT - decimals)
    macs = [round(p * 10**EXACT) for p in parts]
    floors = [m // unit for m in macs]
    short = round(sum(macs) / unit) - sum(floors)
    order = sorted(range(len(macs)), key=lambda i: macs[i] - floors[i] * unit, reverse=True)
    for i in order[: max(short, 0)]:
        floors[i] += 1
    return [f / 10**decimals for f in floors]
