"""CPU thread policy: stay efficient when the cores are shared with other processes.

PyTorch's CPU kernels run on an OpenMP pool (libgomp on Linux). By default its idle threads
spin-wait for the next parallel region; with another busy process on the same cores the spinning
threads take turns with it, and every parallel region waits for the slowest thread. Measured on
the 2-core machine (issue 16): the demo sweep takes 23 s idle, 102 s with 2 threads next to one
busy process, 47 s with 1 thread, 44 s with 2 threads and ``OMP_WAIT_POLICY=PASSIVE`` (threads
sleep instead of spinning; about 15% slower when the machine is idle).

The policy, applied when ``tpool_cli`` is imported (:func:`early_policy`, which must run before
torch is: OpenMP reads its environment once, when the pool starts):

* ``OMP_WAIT_POLICY`` already set (to anything): left alone, the user decides.
* otherwise, when the cores are shared — the 1-minute load average, taken before tpool starts
  any work, is above :data:`SHARED_LOAD` of a core — ``OMP_WAIT_POLICY=PASSIVE`` is set;
  on an idle machine nothing changes (spinning is faster there).
* ``--threads N`` (``pareto``, ``evaluate``, ``bench``; or ``TPOOL_THREADS=N``) sets the intra-op
  threads (:func:`set_threads`); the default is torch's (one per core).

The threads and wait policy in use are recorded with every speed figure (``speed_load``).
``benchmarks/threads.py`` measures the policy in one run, idle and next to a busy process.
"""

from __future__ import annotations

import os
import sys
from typing import MutableMapping, Optional

from .errors import TpoolError

SHARED_LOAD = 0.5  # load average (runnable threads of other processes) that counts as shared cores


def early_policy(environ: MutableMapping[str, str] = os.environ) -> Optional[str]:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when the cores are shared and nobody chose a policy.

    Returns the policy set, or None when nothing was changed (already chosen, torch already
    imported so too late, or an idle machine)."""
    if "OMP_WAIT_POLICY" in environ or "torch" in sys.modules or not hasattr(os, "getloadavg"):
        return None
    if os.getloadavg()[0] <= SHARED_LOAD:
        return None
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"


def parse_threads(value: Optional[int | str]) -> Optional[int]:
    """``--threads`` / ``TPOOL_THREADS`` as a positive int (None: torch's default)."""
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise TpoolError(f"--threads takes a positive integer, got {value!r}") from None
    if n < 1:
        raise TpoolError(f"--threads must be >= 1, got {n}")
    return n


def set_threads(threads: Optional[int]) -> Optional[int]:
    """Apply ``--threads`` (or ``TPOOL_THREADS`` when it is None); returns the count set, if any."""
    n = parse_threads(threads if threads is not None else os.environ.get("TPOOL_THREADS"))
    if n is not None:
        import torch

        torch.set_num_threads(n)
    return n
