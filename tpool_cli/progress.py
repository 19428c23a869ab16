"""Rich progress bars on stderr for the commands that run models over images.

Kept apart from the library: library functions take a plain ``progress(n)`` callback, the
commands plug these bars into it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TextColumn, TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .output import stderr


class RateColumn(ProgressColumn):
    """Items per second of a task (Rich's own speed estimate), e.g. '812 img/s'."""

    def __init__(self, unit: str = "img/s") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", self.unit)
        if not unit:
            return Text("")
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {unit}" if speed else f"- {unit}", style="cyan")


def make_progress(transient: bool = False) -> Progress:
    """A progress display on stderr: description, bar, done/total, rate, elapsed, ETA."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=stderr,
        transient=transient,
    )


@contextmanager
def image_progress(description: str, total: int, transient: bool = False) -> Iterator["Advance"]:
    """``with image_progress('evaluating', n) as advance: evaluate(..., progress=advance)``."""
    with make_progress(transient) as progress:
        task = progress.add_task(description, total=total)
        yield Advance(progress, task)


class Advance:
    """Callable that advances one task of a Progress by n items."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self.progress = progress
        self.task = task

    def __call__(self, n: int) -> None:
        self.progress.advance(self.task, n)


class RichSweepProgress:
    """A sweep's progress on stderr: points done / total with ETA, and a bar for the current point
    (or for the one-time decode). Implements :class:`tpool_cli.sweep.SweepProgress`."""

    def __init__(self) -> None:
        self.progress = make_progress()
        self.points: Optional[TaskID] = None
        self.current: Optional[TaskID] = None

    def __enter__(self) -> "RichSweepProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start(self, total_points: int, done_points: int) -> None:
        self.points = self.progress.add_task("points", total=total_points, completed=done_points, unit="")

    def _bar(self, description: str, total: int, unit: str = "img/s") -> Advance:
        if self.current is None:
            self.current = self.progress.add_task(description, total=total, unit=unit)
        else:
            self.progress.reset(self.current, description=description, total=total, unit=unit)
        return Advance(self.progress, self.current)

    def decode(self, total_files: int) -> Advance:
        return self._bar("decoding (once)", total_files)

    def point(self, label: str, total_images: int) -> Advance:
        return self._bar(label, total_images)

    def point_done(self, row: dict) -> None:
        if self.points is not None:
            self.progress.advance(self.points, 1)

    def bench_start(self, total_steps: int) -> Advance:
        return self._bar("bench", total_steps, unit="")

    def bench(self, message: str) -> None:
        """Show what the bench pass is timing on its bar; the per-variant results go to bench.jsonl."""
        if self.current is not None and not message.startswith("  "):
            self.progress.update(self.current, description=f"bench: {message.strip()}")
