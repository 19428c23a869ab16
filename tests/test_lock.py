"""One sweep per folder (issue 16, item 4): a second sweep fails at once, naming the first; SIGKILL frees it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tpool_cli.errors import TpoolError
from tpool_cli.lock import LOCK_FILE, SweepLock

# Another sweep, as lock.py holds the lock (flock on OUT/.tpool.lock, holder named in the file),
# in plain Python: importing tpool_cli would load torch, seconds per process on a shared machine.
HOLD = """
import fcntl, os, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
fd = os.open(os.path.join(sys.argv[1], ".tpool.lock"), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.write(fd, f"pid {os.getpid()} (tpool pareto --out {sys.argv[1]})\\n".encode())
print("locked", flush=True)
time.sleep(120)
"""
PROBE = """
import fcntl, os, sys
fd = os.open(os.path.join(sys.argv[1], ".tpool.lock"), os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    sys.exit(3)
"""


def _env() -> dict[str, str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/out (a sweep in progress)."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield out, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_second_sweep_fails_at_once_naming_the_first(holder):
    out, proc = holder
    t0 = time.perf_counter()
    with pytest.raises(TpoolError) as info:
        SweepLock.acquire(out)
    assert time.perf_counter() - t0 < 1.0  # never waits
    message = str(info.value)
    assert f"pid {proc.pid}" in message and "tpool pareto --out" in message and "in use by another sweep" in message
    assert "\n" not in message


def test_a_second_pareto_process_exits_non_zero_and_writes_no_row(holder):
    out, proc = holder
    done = subprocess.run([sys.executable, "-m", "tpool_cli", "pareto", "--ops", "topk", "--keep", "0.5", "--limit", "8",
                           "--out", str(out)], env={**_env(), "COLUMNS": "300"}, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"pid {proc.pid}" in errors[0] and "Traceback" not in done.stderr
    assert not (out / "results.jsonl").exists()  # nothing evaluated, nothing appended


def test_the_lock_is_free_after_sigkill(holder):
    out, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / LOCK_FILE).exists()  # the file may stay: the kernel released the flock with the process
    with SweepLock.acquire(out) as lock:
        assert f"pid {os.getpid()}" in (out / LOCK_FILE).read_text()
    assert lock is not None


def test_the_lock_is_re_entrant_in_one_process_and_released_by_the_last_holder(tmp_path):
    outer = SweepLock.acquire(tmp_path)
    with SweepLock.acquire(tmp_path):  # run_sweep inside the command that already holds it
        pass
    probe = [sys.executable, "-c", PROBE, str(tmp_path)]
    held = subprocess.run(probe, env=_env(), capture_output=True, text=True, timeout=60)
    assert held.returncode == 3  # still held by `outer`
    outer.release()
    outer.release()  # idempotent
    free = subprocess.run(probe, env=_env(), capture_output=True, text=True, timeout=60)
    assert free.returncode == 0, free.stderr
