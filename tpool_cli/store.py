"""The results store of a sweep folder: ``results.jsonl``, ``bench.jsonl``, ``plan.json`` and their keys.

No torch, no timm: ``tpool report`` turns these files into tables and plots with this module and
pandas alone. Rows are plain dicts; a point's key (:func:`point_key`) hashes everything its numbers
depend on (:func:`point_identity`), a bench row's key (:func:`bench_key`) what a synthetic-batch
timing depends on. The writers are append-only and survive being killed (:class:`ResultsStore`).
Messages go to the ``tpool_cli`` logger (or the ``log`` callback given); nothing here prints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import TpoolError

RESULTS_FILE = "results.jsonl"
BENCH_FILE = "bench.jsonl"
PLAN_FILE = "plan.json"  # the point keys of the latest sweep, in order: what `tpool report` rebuilds
# What a result depends on; two points with equal values here are the same measurement.
KEY_FIELDS = (
    "model", "weights_id", "data_fingerprint", "op", "op_options", "keep", "tokens", "r", "layers", "img_size",
    "dtype", "device", "prop_attn", "seed",
    # throughput depends on these too: a point timed otherwise is not reused next to fresh ones
    "device_name", "batch_size", "compile", "torch", "timm", "tpool",
    "finetune",  # tpool pareto --finetune-epochs: the recipe and train data (absent off the shelf)
)
FINETUNE_KEY_FIELDS = ("epochs", "recipe", "train_fingerprint")  # of a row's finetune record
# Point-key fields a timing on a synthetic batch does not depend on.
DATA_FIELDS = ("data_fingerprint", "batch_size")
# What a point row gains from its bench row (the report's speed figures when present).
MERGED_FIELDS = (
    "bench_img_s", "bench_baseline_img_s", "bench_ideal_img_s", "bench_vs_baseline", "bench_vs_ideal",
    "bench_ideal_vs_baseline", "bench_compile_s", "bench_error", "bench_run", "bench_batch_size", "bench_dtype",
    "bench_compile", "bench_steps", "bench_repeats",
) + ("bench_runs_img_s", "bench_spread", "bench_load", "bench_flag")  # speedflags.py: spread, load, flag

Log = Callable[[str], None]
logger = logging.getLogger("tpool_cli")


def warn(message: str) -> None:
    """The default ``log`` of the library: a warning on the ``tpool_cli`` logger (the CLI shows it on stderr)."""
    logger.warning(message)


def point_identity(row: dict[str, Any]) -> dict[str, Any]:
    """The fields of a (planned or finished) row that decide its numbers."""
    weights_id = row.get("weights_sha256") or row.get("weights")
    ident = {k: row.get(k) for k in KEY_FIELDS if k != "weights_id"}
    ident["weights_id"] = weights_id
    if ident["r"] is None:
        del ident["r"]  # keep/tokens points: the same key as before r schedules existed
    if isinstance(ident["finetune"], dict) and "recipe" in ident["finetune"]:  # the recipe, not how far a resumed run got or where it wrote
        ident["finetune"] = {k: ident["finetune"].get(k) for k in FINETUNE_KEY_FIELDS}
    else:
        del ident["finetune"]  # off the shelf: the same key as before fine-tuned points existed
    return ident


def point_key(row: dict[str, Any]) -> str:
    """Short stable hash of :func:`point_identity`."""
    text = json.dumps(point_identity(row), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def bench_key(ident: dict[str, Any], settings: Any, dtype: str) -> str:
    """Key of a point's bench row, from the point's identity (a :func:`point_identity`-style dict).

    The point's fields minus the data it was evaluated on (:data:`DATA_FIELDS`: another ``--limit``
    or evaluation batch size does not change a synthetic-batch timing), plus the timing settings
    (a ``BenchSettings`` dataclass or its dict) with the resolved precision (``dtype``: 'fp32', 'bf16'...).
    """
    timing = asdict(settings) if is_dataclass(settings) else dict(settings)
    timing.pop("img_size", None)  # the point already has the resolution
    timing["amp"] = dtype
    point = {k: v for k, v in point_identity(ident).items() if k not in DATA_FIELDS}
    text = json.dumps({"point": point, "timing": timing}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class ResultsStore:
    """``results.jsonl``: append-only, one JSON object per line, safe against being killed.

    Appends are one ``os.write`` of a whole line on an ``O_APPEND`` descriptor followed by fsync,
    so a kill leaves either the complete line or, at worst, a truncated last line; :meth:`read`
    detects a truncated last line (no final newline: a line is always written whole, newline
    included), warns, and, with ``repair``, cuts it off the file so the next append starts on a
    clean line. A complete line that is not a JSON object is reported and ignored, never cut.
    """

    def __init__(self, path: Path, log: Optional[Log] = None, keep: str = "first") -> None:
        self.path = Path(path)
        self.log = log or warn
        self.keep = keep  # which row of a repeated key counts: "first" (results) or "last" (re-timed bench rows)

    def read(self, repair: bool = True) -> list[dict[str, Any]]:
        """All complete rows, one per key (see ``keep``); ``repair=False`` never writes."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise TpoolError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        lines = data.split(b"\n")
        good_end = len(data)
        if lines and lines[-1] == b"":
            lines.pop()
        elif lines:  # no newline at the end: the last line was cut while being written
            good_end = len(data) - len(lines[-1])
            self.log(f"{self.path}: dropped a truncated last line ({len(lines[-1])} bytes); that point will be evaluated again")
            lines.pop()
        rows = self._rows(lines)
        if repair and good_end < len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(good_end)
                fh.flush()
                os.fsync(fh.fileno())
        return rows

    def _rows(self, lines: list[bytes]) -> list[dict[str, Any]]:
        """The JSON objects of complete lines, one per key."""
        rows: list[dict[str, Any]] = []
        seen: dict[Any, int] = {}  # key -> index in rows
        for number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError:
                self.log(f"{self.path}: line {number} is not a JSON object; ignored")
                continue
            key = row.get("key")
            if key in seen:
                if self.keep == "last":
                    rows[seen[key]] = row
                else:
                    self.log(f"{self.path}: line {number} repeats point {row.get('op')} {row.get('schedule')}; ignored")
                continue
            seen[key] = len(rows)
            rows.append(row)
        return rows

    def append(self, row: dict[str, Any]) -> None:
        """Write ``row`` as one line, durably, before returning."""
        line = (json.dumps(row, default=str) + "\n").encode()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(line)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:  # a full disk or a read-only folder: one clear line, the rows before it kept
            raise TpoolError(f"cannot write {self.path}: {exc.strerror or exc}") from None


def write_text(path: Path, text: str) -> None:
    """Write a file atomically (temp file + rename), creating its folder."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        raise TpoolError(f"cannot write {path}: {exc.strerror or exc}") from None


def move_aside(path: Path) -> Path:
    """Rename ``path`` to ``NAME.old`` (then ``.old.2``, ...), never overwriting an earlier one."""
    aside = next(p for n in range(1, 10_000) if not (p := path.with_name(f"{path.name}.old{'' if n == 1 else f'.{n}'}")).exists())
    path.replace(aside)
    return aside


def write_plan(out: Path, keys: list[str], bench_keys: Optional[dict[str, str]] = None) -> None:
    """``plan.json``: the latest sweep's point keys in order, and (with a bench pass) their bench keys."""
    plan: dict[str, Any] = {"keys": keys}
    if bench_keys is not None:
        plan["bench"] = bench_keys
    write_text(Path(out) / PLAN_FILE, json.dumps(plan, indent=1) + "\n")


def merge_bench(rows: list[dict[str, Any]], bench_rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Point rows with their bench figures (``MERGED_FIELDS``) added; rows without one are left as they are."""
    merged = []
    for row in rows:
        extra = bench_rows.get(row.get("key", ""))
        merged.append({**row, **{f: extra.get(f) for f in MERGED_FIELDS}} if extra else row)
    return merged


def read_bench(out: Path, wanted: dict[str, str], log: Optional[Log] = None) -> dict[str, dict[str, Any]]:
    """{point key: bench row} for ``wanted`` ({point key: bench key}, from plan.json), read only.

    The newest row of a key wins (a point timed again after an error)."""
    path = Path(out) / BENCH_FILE
    if not wanted or not path.is_file():
        return {}
    store = ResultsStore(path, log, keep="last")
    by_key = {row.get("key"): row for row in store.read(repair=False)}
    return {point_key: by_key[key] for point_key, key in wanted.items() if key in by_key}
