"""Devices and precision, resolved once for every command: clear errors for what this machine lacks."""

from __future__ import annotations

import ctypes
import platform
import sys
from typing import Any, Optional

import torch

from .errors import TpoolError

AMP_CHOICES = ("bf16", "fp16", "none")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; asking for CUDA without it is the user's mistake."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise TpoolError(
                f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                "use --device cpu or --device auto"
            )
        try:
            device = torch.device(name)
        except RuntimeError:
            raise TpoolError(f"unknown device {name!r}; choose auto, cuda (or cuda:N) or cpu") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TpoolError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    raise TpoolError(f"unknown device {name!r}; choose auto, cuda (or cuda:N) or cpu")


def resolve_amp(amp: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype: bf16 by default on CUDA, none (fp32) on CPU."""
    if amp is None:
        amp = "bf16" if device.type == "cuda" else "none"
    amp = {"fp32": "none", "float32": "none", "bfloat16": "bf16", "float16": "fp16"}.get(amp.lower(), amp.lower())
    if amp not in _AMP_DTYPES:
        raise TpoolError(f"unknown --amp {amp!r}; choose {', '.join(AMP_CHOICES)}")
    if amp == "fp16" and device.type != "cuda":
        raise TpoolError("--amp fp16 needs CUDA; on the CPU use --amp bf16 or none")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TpoolError("this GPU does not support bf16; use --amp fp16 or none")
    return _AMP_DTYPES[amp]


def dtype_label(amp_dtype: Optional[torch.dtype]) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[amp_dtype]


def device_name(device: torch.device) -> str:
    """Human-readable name of the device the numbers were measured on (they mean nothing without it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{name} ({threads} thread{'s' if threads != 1 else ''})"


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a timer measures work done rather than work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# glibc mallopt parameters, and what tpool sets them to: no mmap'd blocks at all (large tensors
# come from the heap too), and up to 1 GiB of freed memory at the top of the heap kept, not trimmed
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
TRIM_THRESHOLD_BYTES = 1 << 30
_steady = False


def steady_host_allocator() -> bool:
    """Keep freed CPU tensors in malloc's heap instead of handing them back to the OS (Linux/glibc).

    PyTorch's CPU tensors come from plain ``malloc``. glibc serves blocks above a *dynamic*
    threshold with a fresh ``mmap`` and returns them (and the top of the heap) to the OS on free,
    so a forward pass page-faults its activations in again, or not, depending on which
    allocation sizes came before (and every block above 32 MiB always, whatever the threshold).
    Timings then depend on history: in an interleaved bench of a tiny ViT the unpatched baseline
    came out 15-40% slower than a model with 1.5% fewer tokens, in some processes and not in
    others; and a token reduction that moves a tensor below the mmap threshold looks faster for
    the allocator's sake. With mmap off and a 1 GiB trim threshold, a repeated forward pass
    reuses its memory without page faults (measured: 0 minor faults per 33-300 MiB tensor, against
    one per 4 KiB page before). Process-wide and permanent (glibc cannot restore its dynamic
    threshold); freed memory then stays with the process (free space at the top of the heap up to
    1 GiB, freed blocks below live ones whatever their size) until :func:`release_host_memory`,
    which the sweep calls when it drops its image cache. Called by
    :func:`tpool_cli.bench.bench` and :func:`tpool_cli.evaluate.evaluate` before timing on a CPU.
    Returns whether the allocator is (now) steady; False where there is no glibc.
    """
    global _steady
    if _steady:
        return True
    mallopt = _glibc("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    _steady = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _steady


def release_host_memory() -> bool:
    """Hand the CPU memory that is free in malloc's heap back to the OS (glibc ``malloc_trim``).

    With the steady allocator, freed blocks stay with the process; after dropping something big
    (a sweep's decoded-image cache) this returns them, at the cost of page faults when the memory
    is used again. Returns whether anything could be done (False without glibc).
    """
    trim = _glibc("malloc_trim", [ctypes.c_size_t])
    if trim is None:
        return False
    trim(0)
    return True


def _glibc(name: str, argtypes: list) -> Optional[Any]:
    """glibc's function ``name`` (returning int) through ctypes, or None where there is no glibc."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn
