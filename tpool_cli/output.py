"""Rendering result rows: Rich tables to stdout, JSON/CSV to stdout or a file.

Data goes to stdout and everything else (progress, logs, warnings) to stderr, so
``tpool ... --format json | jq`` works.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from typing import TYPE_CHECKING

from .errors import TpoolError
from .store import write_text  # noqa: F401  (re-exported: the library writes files through the store)

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console
    from rich.table import Table

FORMATS = ("table", "json", "csv")


def _console(name: str) -> "Console":
    """The ``stdout`` or ``stderr`` Rich console, made on first use (importing this module loads no Rich)."""
    console = globals().get(name)
    if console is None:
        from rich.console import Console

        # stdout wide enough for the per-layer tables when piped (Rich would otherwise assume 80 columns)
        console = Console(width=None if sys.stdout.isatty() else 160) if name == "stdout" else Console(stderr=True, soft_wrap=True)
        globals()[name] = console
    return console


def __getattr__(name: str) -> "Console":
    if name in ("stdout", "stderr"):
        return _console(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise TpoolError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    return fmt


def to_json(payload: Any) -> str:
    return json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n"


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """Flat CSV of rows; nested values (lists, dicts) are JSON-encoded in their cell."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return buf.getvalue()


def make_table(title: str, columns: Iterable[str], rows: Iterable[Sequence[Any]], caption: Optional[str] = None) -> "Table":
    from rich.table import Table

    table = Table(title=title, caption=caption, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    return table


def emit(payload: Any, csv_rows: Sequence[dict[str, Any]], fmt: str, output: Optional[Path], tables: Sequence["Table"]) -> None:
    """Print in ``fmt`` to stdout; with ``output`` also write JSON or CSV (by suffix, else by fmt)."""
    if fmt == "json":
        sys.stdout.write(to_json(payload))
    elif fmt == "csv":
        sys.stdout.write(to_csv(csv_rows))
    else:
        for table in tables:
            _console("stdout").print(table)
    if output is not None:
        kind = "csv" if output.suffix == ".csv" or (fmt == "csv" and output.suffix != ".json") else "json"
        write_text(output, to_csv(csv_rows) if kind == "csv" else to_json(payload))
        _console("stderr").print(f"wrote {output}")


def token_path(counts: Sequence[int]) -> str:
    """Token counts per block, shown where they change: [196, 196, 137, 137, 96] -> '196→137→96'."""
    if not counts:
        return ""
    shown = [counts[0]] + [b for a, b in zip(counts, counts[1:]) if b != a]
    return "→".join(map(str, shown))
