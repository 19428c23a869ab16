"""One sweep per output folder: an exclusive advisory lock on ``OUT/.tpool.lock``.

Two ``tpool pareto`` runs on the same ``--out`` would evaluate every point twice and append
duplicate rows. The sweep holds ``fcntl.flock(LOCK_EX | LOCK_NB)`` on a file in the folder while
it runs; a second sweep finds it taken and fails at once with one line naming the holder (its
pid and command, written into the lock file by the holder). The kernel releases a flock when
the last descriptor of it closes, i.e. on any exit of the holding process, SIGKILL included, so
a lock is never stale: the file may stay behind, the lock does not. Readers (``tpool report``)
never take it; they only read files the sweep writes whole.

Within one process the lock is re-entrant (the command takes it early, before loading the model,
and :func:`tpool_cli.sweep.run_sweep` takes it again): flock conflicts between two descriptors
of the same file even in one process, so a per-process count on one descriptor is kept.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from .errors import TpoolError

LOCK_FILE = ".tpool.lock"
_held: dict[str, list[int]] = {}  # resolved lock path -> [fd, holders] of this process


def _describe_holder(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another process (no pid recorded yet)"


class SweepLock:
    """The held lock of one folder; :meth:`release`, dropping the object, or the process's exit frees it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._released = False

    @classmethod
    def acquire(cls, out: str | Path, command: Optional[str] = None) -> "SweepLock":
        """Take the folder's lock (creating the folder), or raise TpoolError naming its holder."""
        import fcntl

        out = Path(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TpoolError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
        path = out / LOCK_FILE
        key = str(path.resolve())
        if key in _held:
            _held[key][1] += 1
            return cls(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise TpoolError(f"cannot create the lock file {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TpoolError(
                f"{out} is in use by another sweep: {_describe_holder(path)}; wait for it to finish or give another --out"
            ) from None
        except OSError as exc:  # a file system without flock: say so instead of running unguarded silently
            os.close(fd)
            raise TpoolError(f"cannot lock {path}: {exc.strerror or exc}") from None
        text = f"pid {os.getpid()} ({command or ' '.join(['tpool', *sys.argv[1:]]) or 'python'})\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        _held[key] = [fd, 1]
        return cls(path)

    def release(self) -> None:
        """Give the lock back (idempotent); the last holder in this process closes the descriptor."""
        if self._released:
            return
        self._released = True
        key = str(self.path.resolve())
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _held[key]
            try:
                os.ftruncate(entry[0], 0)  # no holder named any more
            except OSError:
                pass
            os.close(entry[0])  # closing the descriptor releases the flock

    def __del__(self) -> None:  # a holder dropped without release (a command returning): give it back
        try:
            self.release()
        except Exception:
            pass

    def __enter__(self) -> "SweepLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holds_out_lock(fn):
    """Decorator: run ``fn`` holding the lock of its ``out`` argument (released however it ends)."""
    import functools
    import inspect

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .distributed import is_main

        if not is_main():  # under torchrun rank 0 holds the lock for the whole job
            return fn(*args, **kwargs)
        out = signature.bind(*args, **kwargs).arguments["out"]
        with SweepLock.acquire(out):
            return fn(*args, **kwargs)

    return wrapper
