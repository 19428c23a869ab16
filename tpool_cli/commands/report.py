"""`tpool report`: rebuild a sweep's tables and plots from results.jsonl, or compare two sweeps."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..cli_options import FailBelowOpt, FormatOpt, OutputOpt
from ..errors import TpoolError
from ..output import check_format, emit, make_table, stderr
from .common import finish_report



def report(
    folders: Annotated[list[Path], typer.Argument(help="A sweep's --out folder; two folders: compare them side by side.")],
    fail_below: FailBelowOpt = None,
    fmt: FormatOpt = "table",
    output: OutputOpt = None,
    all_rows: Annotated[bool, typer.Option("--all", help="Every row of results.jsonl, not only the latest sweep's plan.")] = False,
) -> None:
    """Rebuild results.csv, pareto.md and the plots of a sweep from its results.jsonl (no evaluation)."""
    from ..report import load_rows, parse_gate

    check_format(fmt)
    gates = [parse_gate(g) for g in fail_below or []]
    if len(folders) == 1:
        if output is not None:
            raise TpoolError("--output is for comparisons (tpool report A B); one folder is rebuilt in place")
        code = finish_report(folders[0], load_rows(folders[0], all_rows=all_rows), fmt, gates, all_rows=all_rows)
        sys.exit(code)
    if len(folders) != 2:
        raise TpoolError(f"tpool report takes one folder (rebuild) or two (compare), got {len(folders)}")
    if gates:
        raise TpoolError("--fail-below applies to one folder; run it on each")
    _compare(folders[0], folders[1], fmt, output)


def _compare(a: Path, b: Path, fmt: str, output: Optional[Path]) -> None:
    from ..report import bench_settings, compare, has_bench, load_rows, results_frame

    names = (a.name, b.name) if a.name != b.name else (str(a), str(b))
    frame_a, frame_b = results_frame(load_rows(a)), results_frame(load_rows(b))
    if has_bench(frame_a) != has_bench(frame_b):
        only = names[0] if has_bench(frame_a) else names[1]
        stderr.print(f"[yellow]warning:[/yellow] only {only} has --bench figures: comparing model-only img/s", highlight=False)
    elif has_bench(frame_a) and bench_settings(frame_a) != bench_settings(frame_b):
        stderr.print(f"[yellow]warning:[/yellow] the sweeps were benched differently ({names[0]}: {bench_settings(frame_a)}; "
                     f"{names[1]}: {bench_settings(frame_b)}): speed B/A mixes machine and settings", highlight=False)
    table_df = compare(frame_a, frame_b)
    rows = [{k: (None if v != v else v) for k, v in r.items()} for r in table_df.to_dict("records")]  # NaN -> None

    def cell(v: Any, digits: int = 2) -> str:
        return "—" if v is None else (f"{v:,.{digits}f}" if isinstance(v, float) else str(v))

    speed, unit = ("bench_img_s", "bench img/s") if "bench_img_s_a" in table_df.columns else ("model_only_img_s", "img/s")
    lines = [
        (r["op"], r["schedule"], cell(r["gmacs_a"], 4), cell(r["gmacs_b"], 4), cell(r["top1_a"]), cell(r["top1_b"]),
         cell(r["delta_top1"]), cell(r[f"{speed}_a"], 0), cell(r[f"{speed}_b"], 0), cell(r["speed_ratio"], 3))
        for r in rows
    ]
    headers = ["op", "schedule", f"GMACs {names[0]}", f"GMACs {names[1]}", f"top-1 {names[0]}", f"top-1 {names[1]}",
               "Δ top-1 (B-A)", f"{unit} {names[0]}", f"{unit} {names[1]}", "speed B/A"]
    table = make_table(f"{names[0]} (A) vs {names[1]} (B)", headers, lines)
    emit({"a": str(a), "b": str(b), "points": rows}, rows, fmt, output, [table])
