"""What several commands share: the demo announcement, the random-weights warning, the report step."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..output import stderr, stdout, to_csv, to_json

if TYPE_CHECKING:  # pragma: no cover
    from ..models import Workload

RANDOM_WEIGHTS_NOTE = "RANDOM WEIGHTS (--random-init): accuracy is meaningless, throughput and GMACs are real"


def announce(work: "Workload") -> None:
    """Tell the user when the built-in demo stands in for --model/--data, and how to leave it."""
    if work.announcement:
        stderr.print(f"[cyan]built-in demo:[/cyan] {work.announcement}", highlight=False)


def warn_random_weights() -> None:
    stderr.print(f"[yellow]warning:[/yellow] {RANDOM_WEIGHTS_NOTE}")


def finish_report(out: Path, rows: list[dict[str, Any]], fmt: str, gates: Sequence, all_rows: bool = False) -> int:
    """Write the files, print the frontier (or all points as JSON/CSV), check the gates: exit code."""
    from ..report import check_gates, frontier_rich_table, world_size_note, write_report

    rep = write_report(out, rows, all_rows=all_rows)
    if rep.coverage.partial:
        stderr.print(f"[yellow]{rep.coverage.banner()}[/yellow] in {out}: the report covers what is done", highlight=False)
    df = rep.frame
    mixed = world_size_note(df)
    if mixed:
        stderr.print(f"[yellow]warning:[/yellow] {mixed}", highlight=False)
    b = df[df["op"] == "none"].iloc[0]
    if fmt == "json":
        sys.stdout.write(to_json({"out": str(out), "points": rows, "frontier": df[df["frontier"]]["key"].tolist()}))
    elif fmt == "csv":
        sys.stdout.write(to_csv(rows))
    else:
        title = f"Pareto frontier (top-1 vs GMACs): {b['model']} @ {b['img_size']}px, {int(b['images'])} images, {b['dtype']} on {b['device_name']}"
        stdout.print(frontier_rich_table(df, title))
    stderr.print(f"wrote {', '.join(p.name for p in rep.files)} in {out}", highlight=False)
    failures = check_gates(df, gates)
    for message in failures:
        stderr.print(f"[red]fail-below:[/red] {message}", highlight=False)
    if gates and not failures:
        stderr.print(f"[green]all {len(gates)} --fail-below gate(s) passed[/green]")
    return 1 if failures else 0
