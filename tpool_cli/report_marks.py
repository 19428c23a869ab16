"""What a report says about each point beyond its numbers: how sure, how comparable, how honest.

Functions of a results frame (pandas, no torch), used by :mod:`tpool_cli.report`:

* :func:`add_uncertainty` — 95% Wilson intervals of top-1 and top-5 from each row's counts, and
  the comparison with the baseline on the same images: the images each one got right alone
  (``gain``: right only with the operator, ``loss``: right only without) and McNemar's exact
  p-value (``p_base``), from the per-image records ``correct1_bits``. Rows without a record (older
  sweeps) or on other images get the unpaired two-proportion test, marked ``unpaired``.
* :func:`mark_capped` — points beyond an operator's cap: the same operator, realised token
  counts and GMACs as a point of higher keep (ToMe cannot merge more than half the tokens of a
  block, so keep 0.3 runs as keep 0.5). They are marked ``capped``, kept in the tables and left
  out of frontiers and plots (drawn once, as the point they equal).
* :func:`mark_speed` — the flag of the speed figure the report shows (:mod:`tpool_cli.speedflags`).
* :func:`ranking` — at each schedule, the operators by top-1, each compared with the leader
  (paired where both rows hold records of the same images), significant at 0.05 or not.
* :class:`Coverage` — how many planned points the rows hold (the "partial" banner) and how many
  rows of results.jsonl a report leaves out.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional

import pandas as pd

from . import stats
from .speedflags import row_flag


def _count(row: pd.Series, field: str, pct: str) -> Optional[int]:
    """A row's correct count (``correct1``), or one recovered from its percentage (older rows)."""
    value = row.get(field)
    if _real(value):
        return int(value)
    images, top = row.get("images"), row.get(pct)
    if _real(images) and _real(top) and images > 0:
        return int(round(float(top) * float(images) / 100.0))
    return None


def _images(row: pd.Series) -> int:
    n = row.get("images")
    return int(n) if _real(n) else 0


def compare_rows(a: pd.Series, b: pd.Series) -> dict[str, Any]:
    """A (reference) against B: paired McNemar when both have records of the same images, else unpaired."""
    n_a, n_b = _images(a), _images(b)
    same_images = n_a == n_b and a.get("data_fingerprint") == b.get("data_fingerprint")
    paired = stats.paired_p(a.get("correct1_bits"), b.get("correct1_bits"), n_a) if same_images else None
    if paired is not None:
        only_a, only_b, p = paired
        return {"paired": True, "gain": only_b, "loss": only_a, "p": p}
    k_a, k_b = _count(a, "correct1", "top1"), _count(b, "correct1", "top1")
    p = stats.two_proportion(k_a, n_a, k_b, n_b) if k_a is not None and k_b is not None else float("nan")
    return {"paired": False, "gain": None, "loss": None, "p": p}


def add_uncertainty(df: pd.DataFrame, base: pd.Series) -> None:
    """Columns top1_lo/hi, top5_lo/hi (percent), paired, gain, loss, p_base, sig_base (in place)."""
    for top, field in (("top1", "correct1"), ("top5", "correct5")):
        bounds = [stats.wilson_pct(k, _images(r)) if (k := _count(r, field, top)) is not None else (math.nan, math.nan)
                  for _, r in df.iterrows()]
        df[f"{top}_lo"] = [lo for lo, _ in bounds]
        df[f"{top}_hi"] = [hi for _, hi in bounds]
    results = [compare_rows(base, r) if r["op"] != "none" else {"paired": None, "gain": None, "loss": None, "p": math.nan}
               for _, r in df.iterrows()]
    df["paired"] = [c["paired"] for c in results]
    df["gain"] = [c["gain"] for c in results]
    df["loss"] = [c["loss"] for c in results]
    df["p_base"] = [round(c["p"], 6) if not math.isnan(c["p"]) else math.nan for c in results]
    df["sig_base"] = [bool(c["p"] < stats.ALPHA) if not math.isnan(c["p"]) else None for c in results]


def mark_capped(df: pd.DataFrame) -> None:
    """Columns capped (bool) and capped_as (the schedule it equals), in place."""
    capped, same_as = [False] * len(df), [None] * len(df)
    seen: dict[tuple, tuple[float, str]] = {}  # (op, tokens, gmacs) -> (keep, schedule) of the kept point
    order = sorted(range(len(df)), key=lambda i: -(float(df.iloc[i]["keep"]) if _real(df.iloc[i]["keep"]) else math.inf))
    for i in order:
        r = df.iloc[i]
        tokens = r.get("patch_tokens")
        if r["op"] == "none" or not isinstance(tokens, (list, tuple)):
            continue
        ident = (r["op"], tuple(tokens), r.get("gmacs"))
        if ident in seen:
            capped[i], same_as[i] = True, seen[ident][1]
        else:
            seen[ident] = (r["keep"], r["schedule"])
    df["capped"] = capped
    df["capped_as"] = same_as


def _real(value: Any) -> bool:
    """A number that is not NaN (Python or numpy scalars; bools are not numbers here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(float(value))


def mark_speed(df: pd.DataFrame, bench: bool) -> None:
    """Columns speed_spread (of the speed figure shown) and speed_note (its flag), in place."""
    col = "bench_spread" if bench else "model_only_spread"
    df["speed_spread"] = [r.get(col) if _real(r.get(col)) else math.nan for _, r in df.iterrows()]
    df["speed_note"] = [row_flag(r.to_dict(), bench) for _, r in df.iterrows()]


def notes(r: pd.Series) -> str:
    """The table's notes cell: capped, speed flag, unpaired (fixed order)."""
    parts = []
    if r.get("capped"):
        parts.append(f"capped (= {r['capped_as']})")
    if isinstance(r.get("speed_note"), str):
        parts.append(f"speed {r['speed_note']}")
    if r.get("paired") is False:
        parts.append("unpaired")
    return "; ".join(parts)


def p_text(p: Any, paired: Any) -> str:
    """'0.092', '<0.001', with '*' when below 0.05 and ' (u)' when unpaired; '—' when none."""
    if not _real(p):
        return "—"
    text = "<0.001" if p < 0.001 else f"{p:.3f}"
    return text + ("*" if p < stats.ALPHA else "") + (" (u)" if paired is False else "")


def add_text_columns(df: pd.DataFrame) -> None:
    """The formatted cells that combine several fields (leading underscore: left out of results.csv)."""
    def ci(lo: Any, hi: Any) -> str:
        return f"[{lo:.2f}, {hi:.2f}]" if _real(lo) and _real(hi) else "—"

    df["_top1_ci"] = [ci(r["top1_lo"], r["top1_hi"]) for _, r in df.iterrows()]
    df["_top5_ci"] = [ci(r["top5_lo"], r["top5_hi"]) for _, r in df.iterrows()]
    df["_flips"] = [f"+{int(r['gain'])}/−{int(r['loss'])}" if _real(r["gain"]) and _real(r["loss"]) else "—"
                    for _, r in df.iterrows()]
    df["_p_base"] = [p_text(r["p_base"], r["paired"]) for _, r in df.iterrows()]
    df["_spread"] = [f"{r['speed_spread']:.0%}" if _real(r["speed_spread"]) else "—" for _, r in df.iterrows()]
    df["_notes"] = [notes(r) for _, r in df.iterrows()]


def ranking(df: pd.DataFrame) -> list[list[str]]:
    """Rows of the ranking table: per schedule with 2+ operators, by top-1, each vs. the leader."""
    lines: list[list[str]] = []
    points = df[(df["op"] != "none") & ~df["capped"].astype(bool)]
    for schedule in dict.fromkeys(points["schedule"]):
        group = points[points["schedule"] == schedule]
        if len(group) < 2:
            continue
        group = group.sort_values(["top1", "gmacs"], ascending=[False, True], kind="stable")
        leader = group.iloc[0]
        for rank, (_, r) in enumerate(group.iterrows(), start=1):
            if rank == 1:
                vs, sig = "—", "leader"
            else:
                c = compare_rows(leader, r)
                vs = p_text(c["p"], c["paired"])
                sig = "—" if not _real(c["p"]) else ("yes" if c["p"] < stats.ALPHA else "no")
            lines.append([schedule, str(rank), r["op"], f"{r['gmacs']:.4f}", f"{r['top1']:.2f}", r["_top1_ci"],
                          f"{r['top1'] - leader['top1']:+.2f}", vs, sig])
    return lines


RANKING_HEADERS = ["schedule", "rank", "op", "GMACs", "top-1", "top-1 95% CI", "Δ vs. leader", "p vs. leader", "significant"]


@dataclass(frozen=True)
class Coverage:
    """How the rows of a report relate to the sweep's plan and to results.jsonl."""

    planned: Optional[int] = None  # points in plan.json (None: no plan)
    found: Optional[int] = None  # of them, rows present
    left_out: int = 0  # rows of results.jsonl this report does not show
    all_rows: bool = False  # `tpool report --all`

    @property
    def partial(self) -> bool:
        return self.planned is not None and self.found is not None and self.found < self.planned

    def banner(self) -> Optional[str]:
        """'partial: k of n points' when the plan is not complete."""
        return f"partial: {self.found} of {self.planned} points" if self.partial else None


def coverage(out, rows: list[dict[str, Any]], all_rows: bool = False) -> Coverage:
    """:class:`Coverage` of ``rows`` against ``out``'s plan.json and results.jsonl (read only)."""
    import json
    from pathlib import Path

    from .store import PLAN_FILE, RESULTS_FILE, ResultsStore

    out = Path(out)
    try:
        keys = json.loads((out / PLAN_FILE).read_text())["keys"]
        keys = [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else None
    except (OSError, ValueError, KeyError, TypeError):
        keys = None
    shown = {r.get("key") for r in rows}
    stored = ResultsStore(out / RESULTS_FILE, lambda message: None).read(repair=False)
    left_out = sum(1 for r in stored if r.get("key") not in shown)
    if keys is None:
        return Coverage(left_out=left_out, all_rows=all_rows)
    return Coverage(planned=len(keys), found=sum(1 for k in keys if k in shown), left_out=left_out, all_rows=all_rows)
