"""Wall-clock throughput of token reduction: baseline, ideal and operator, measured in one run.

FLOPs are what the operators promise; images per second are what users get. For each operator
at each schedule :func:`bench` times three models on the same synthetic batch:

* **baseline**: the unpatched model (all tokens, timm's own blocks);
* **ideal**: the model patched with ``drop`` (see ``ops/ideal.py``) at the token counts the
  operator really outputs: the same schedule with a reduction that costs nothing and fused
  attention everywhere, i.e. the most any operator could get out of that schedule;
* **operator**: the model patched with the operator.

operator/ideal says how much of the schedule's speedup the operator keeps; operator/baseline
whether it pays off at all. Weights are random: speed does not depend on them. Timing: a first
call (which compiles, under ``compile``) timed on its own, ``warmup`` calls, then ``repeats`` runs
of ``steps`` calls each, with the device synchronised before the clock is read at either end
(CUDA kernels are asynchronous); throughput is the median run. The baseline is measured once per
call and each distinct ideal token path once, shared by the operators that need it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence

import torch
from torch import nn

from .errors import TpoolError
from .ops import TokenOperator, make_operator
from .patch import patch, planned_counts, unpatch
from .schedule import Schedule

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
IDEAL_OP = "drop"
SKIPPED = "skipped: time budget"


# ---------------------------------------------------------------------------------------------
# Device, precision and names


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without CUDA is the user's to fix."""
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TpoolError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise TpoolError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:N)") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TpoolError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    if name == "cpu":
        return torch.device("cpu")
    raise TpoolError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:N)")


def resolve_amp(amp: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype: bf16 by default on CUDA, none on CPU."""
    if amp is None:
        return torch.bfloat16 if device.type == "cuda" else None
    key = amp.strip().lower()
    if key not in AMP_DTYPES:
        raise TpoolError(f"--amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    return AMP_DTYPES[key]


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
    return f"{name} ({torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# Settings and results


@dataclass(frozen=True)
class BenchSettings:
    """How to time: batch, precision, compilation and the number of calls."""

    batch_size: int = 256
    img_size: Optional[int] = None  # None: the model's
    amp: Optional[str] = None  # bf16 / fp16 / none; None: bf16 on CUDA, none on CPU
    compile: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"  # tests use aot_eager: the same tracing, no code generation
    warmup: int = 10
    steps: int = 50
    repeats: int = 3

    def __post_init__(self) -> None:
        for key in ("batch_size", "steps", "repeats"):
            if getattr(self, key) < 1:
                raise TpoolError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.warmup < 0:
            raise TpoolError(f"--warmup must be >= 0, got {self.warmup}")
        if self.compile_mode not in COMPILE_MODES:
            raise TpoolError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")


@dataclass
class Timing:
    """Throughput of one model variant."""

    img_per_s: float  # median over the repeats
    runs_img_per_s: list[float]  # one per repeat, in order (their spread is the noise)
    ms_per_batch: float
    first_call_s: float  # the first forward alone: includes compilation when compiled
    graphs: Optional[int] = None  # compiled: graphs the first call produced (1 = no graph break)
    recompiled: Optional[int] = None  # compiled: graphs compiled after the first call (should be 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "img_per_s": round(self.img_per_s, 3),
            "runs_img_per_s": [round(r, 3) for r in self.runs_img_per_s],
            "ms_per_batch": round(self.ms_per_batch, 4),
            "first_call_s": round(self.first_call_s, 3),
            "graphs": self.graphs,
            "recompiled": self.recompiled,
        }


@dataclass
class Variant:
    """One timed model: the baseline, an ideal token path, or an operator at a schedule."""

    label: str
    tokens_per_block: list[int]  # patch tokens after each block
    gmacs: Optional[float]
    timing: Optional[Timing]
    error: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "tokens_per_block": self.tokens_per_block,
            "gmacs": None if self.gmacs is None else round(self.gmacs, 6),
            **(self.timing.as_dict() if self.timing else {}),
            "error": self.error,
        }


@dataclass
class BenchRow:
    """An operator at a schedule, with the baseline and the ideal it is judged against."""

    op: str
    schedule: Schedule
    depth: int
    baseline: Variant
    ideal: Variant
    operator: Variant

    def row(self, settings: BenchSettings, extra: dict[str, Any]) -> dict[str, Any]:
        """A plain JSON-able row with the full configuration."""
        s = self.schedule

        def rate(v: Variant) -> Optional[float]:
            return v.timing.img_per_s if v.timing else None

        def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
            return round(a / b, 4) if a is not None and b else None

        def compile_s(v: Variant) -> Optional[float]:
            return round(v.timing.first_call_s, 3) if settings.compile and v.timing else None

        op_rate, base_rate, ideal_rate = rate(self.operator), rate(self.baseline), rate(self.ideal)
        return {
            **extra,
            "op": self.op,
            "keep": s.keep if s.keep is not None else None,
            "layers": list(s.reduction_layers(self.depth)),
            "tokens": list(s.tokens) if s.tokens else None,
            "schedule": s.describe(self.depth),
            "tokens_per_block": self.operator.tokens_per_block,
            "baseline_img_s": _round(base_rate),
            "ideal_img_s": _round(ideal_rate),
            "op_img_s": _round(op_rate),
            "op_vs_baseline": ratio(op_rate, base_rate),
            "op_vs_ideal": ratio(op_rate, ideal_rate),
            "ideal_vs_baseline": ratio(ideal_rate, base_rate),
            "baseline_gmacs": _round(self.baseline.gmacs, 6),
            "ideal_gmacs": _round(self.ideal.gmacs, 6),
            "op_gmacs": _round(self.operator.gmacs, 6),
            "baseline_compile_s": compile_s(self.baseline),
            "ideal_compile_s": compile_s(self.ideal),
            "op_compile_s": compile_s(self.operator),
            "op_ms_per_batch": round(self.operator.timing.ms_per_batch, 4) if self.operator.timing else None,
            "op_runs_img_s": [round(r, 3) for r in self.operator.timing.runs_img_per_s] if self.operator.timing else None,
            "op_graphs": self.operator.timing.graphs if self.operator.timing else None,
            "op_recompiled": self.operator.timing.recompiled if self.operator.timing else None,
            "error": self.operator.error or self.ideal.error or self.baseline.error,
        }


@dataclass
class BenchReport:
    settings: BenchSettings
    device: torch.device
    device_name: str
    img_size: int
    amp: Optional[torch.dtype]
    baseline: Variant
    ideals: dict[tuple[int, ...], Variant]
    rows: list[BenchRow] = field(default_factory=list)

    def payload(self, model_name: str) -> dict[str, Any]:
        """Everything, JSON-able: the environment, the settings, the shared variants and the rows."""
        extra = self.row_context(model_name)
        return {
            **extra,
            "torch": torch.__version__,
            "settings": asdict(self.settings),
            "baseline": self.baseline.as_dict(),
            "ideals": [v.as_dict() for v in self.ideals.values()],
            "results": [r.row(self.settings, extra) for r in self.rows],
        }

    def row_context(self, model_name: str) -> dict[str, Any]:
        s = self.settings
        return {
            "model": model_name,
            "img_size": self.img_size,
            "batch_size": s.batch_size,
            "device": str(self.device),
            "device_name": self.device_name,
            "amp": _amp_name(self.amp),
            "compile": s.compile,
            "compile_mode": s.compile_mode if s.compile else None,
        }


def _round(value: Optional[float], digits: int = 3) -> Optional[float]:
    return None if value is None else round(value, digits)


def _amp_name(dtype: Optional[torch.dtype]) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "none") if dtype else "none"


# ---------------------------------------------------------------------------------------------
# Timing


def time_forward(
    model: nn.Module,
    x: torch.Tensor,
    settings: BenchSettings,
    amp: Optional[torch.dtype],
) -> Timing:
    """Time ``model(x)`` as the module docstring says; under ``settings.compile`` compile it first.

    Dynamo's caches are cleared before compiling: the variants share code objects (the patched
    block's forward), and their graphs would otherwise pile up against its recompile limit.
    """
    device = x.device
    fn: Callable[[torch.Tensor], Any] = model
    if settings.compile:
        torch._dynamo.reset()
        fn = torch.compile(model, mode=None if settings.compile_mode == "default" else settings.compile_mode,
                           backend=settings.compile_backend, dynamic=False)
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    graphs_before = _compiled_graphs()
    with torch.no_grad(), autocast:
        synchronize(device)
        start = time.perf_counter()
        fn(x)
        synchronize(device)
        first = time.perf_counter() - start
        graphs_after_first = _compiled_graphs()
        for _ in range(settings.warmup):
            fn(x)
        runs = []
        for _ in range(settings.repeats):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(settings.steps):
                fn(x)
            synchronize(device)
            runs.append(settings.steps * x.shape[0] / (time.perf_counter() - start))
    rate = statistics.median(runs)
    timing = Timing(img_per_s=rate, runs_img_per_s=runs, ms_per_batch=1000.0 * x.shape[0] / rate, first_call_s=first)
    if settings.compile:
        timing.graphs = graphs_after_first - graphs_before
        timing.recompiled = _compiled_graphs() - graphs_after_first
    return timing


def _compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (a counter that ``torch._dynamo.reset`` keeps)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def check_sync_free(model: nn.Module, x: torch.Tensor, amp: Optional[torch.dtype]) -> Optional[str]:
    """On CUDA: None if ``model(x)`` runs without a host-device synchronisation, else the first one.

    Uses CUDA's sync debug mode ("error"), which raises at the first synchronising call (``.item()``,
    ``nonzero``, a device-to-host copy...). One untimed call runs first, outside the check, so that
    lazy initialisation (cuBLAS handles, workspace allocation) is not mistaken for the model's doing.
    """
    if x.device.type != "cuda":
        raise TpoolError("the synchronisation check needs a CUDA device")
    autocast = torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        model(x)
        torch.cuda.synchronize(x.device)
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x)
        except RuntimeError as exc:
            return f"{str(exc).strip().splitlines()[0][:200]} at {_innermost_caller(exc)}"
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize(x.device)
    return None


def _innermost_caller(exc: BaseException) -> str:
    """file:line (function) of the innermost frame outside torch: where the offending call was made."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}torch{os.sep}" not in f.filename]
    if not frames:
        return "?"
    f = frames[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno} ({f.name})"


# ---------------------------------------------------------------------------------------------
# The benchmark


def synthetic_batch(model: nn.Module, batch_size: int, img_size: Optional[int], device: torch.device) -> torch.Tensor:
    """Random images of the model's input shape (throughput does not depend on pixel values)."""
    embed = model.patch_embed
    channels = embed.proj.in_channels if hasattr(embed, "proj") and hasattr(embed.proj, "in_channels") else 3
    h, w = (img_size, img_size) if img_size else tuple(embed.img_size)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, channels, h, w, generator=generator).to(device)


def token_path(model: nn.Module) -> list[int]:
    """Patch tokens after each block of a patched model (static: from shapes alone)."""
    return [out for _, out in planned_counts(model)]


def ideal_schedule(path: Sequence[int]) -> Schedule:
    """A per-block token budget that makes ``drop`` output exactly ``path``."""
    return Schedule(tokens=tuple(path))


def _gmacs(model: nn.Module, img_size: Optional[int], say: Callable[[str], None]) -> Optional[float]:
    """Per-image GMACs from fvcore, or None where it cannot count (timing does not depend on it)."""
    try:
        from .flops import count_flops
    except ImportError:
        say("  fvcore is not installed: no GMACs")
        return None
    try:
        return count_flops(model, img_size).total
    except Exception as exc:  # noqa: BLE001 - a tracing failure must not cost the timing
        say(f"  GMACs not counted ({type(exc).__name__}: {str(exc).strip()[:200]})")
        return None


def bench(
    model: nn.Module,
    configs: Sequence[tuple[TokenOperator, Schedule]],
    settings: BenchSettings = BenchSettings(),
    device: str | torch.device = "auto",
    *,
    prop_attn: bool = False,
    seed: int = 0,
    errors: Literal["raise", "record"] = "raise",
    count_gmacs: bool = True,
    progress: Optional[Callable[[str], None]] = None,
    deadline: Optional[float] = None,
    on_update: Optional[Callable[[BenchReport], None]] = None,
) -> BenchReport:
    """Time the baseline, then each (operator, schedule) with its ideal, on ``model`` (moved to ``device``).

    ``model`` is patched in place for each variant and left unpatched (in eval mode, on the
    device). ``errors="record"`` turns an operator that fails (in patching, tracing or running)
    into a row with its error instead of stopping the run; mistakes in the request (a schedule
    the model cannot take) are still raised before anything is timed. ``prop_attn`` applies to
    the operators, not to the ideal (whose attention stays unbiased, the fastest kind); ``seed``
    to the ``random`` operator. ``deadline`` (a ``time.monotonic()`` value) bounds scripts: no
    variant starts after it, and the rows left get the error "skipped: time budget". ``on_update``
    is called with the report after the baseline and after each row (scripts save partial results).
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    amp = resolve_amp(settings.amp, dev)
    say = progress or (lambda message: None)
    unpatch(model)
    model.eval().to(dev)
    depth = len(model.blocks)
    x = synthetic_batch(model, settings.batch_size, settings.img_size, dev)
    img_size = int(x.shape[-1])
    full_path = _full_path(model)

    # Plan first: validates every request and finds the token paths before any timing.
    plans = []
    for operator, schedule in configs:
        patch(model, operator, schedule=schedule, prop_attn=prop_attn, seed=seed)
        plans.append((operator, schedule, token_path(model)))
        unpatch(model)

    def measure(label: str) -> Variant:
        path = token_path(model) if hasattr(model, "tpool_state") else full_path
        gmacs = _gmacs(model, img_size, say) if count_gmacs else None
        say(f"timing {label}" + (" (compiling)" if settings.compile else ""))
        timing = time_forward(model, x, settings, amp)
        say(f"  {label}: {timing.img_per_s:,.1f} img/s" + (f", first call {timing.first_call_s:.1f} s" if settings.compile else ""))
        return Variant(label, path, gmacs, timing)

    try:
        baseline = measure("baseline")
        report = BenchReport(settings, dev, device_name(dev), img_size, amp, baseline, {})
        if on_update is not None:
            on_update(report)
        for operator, schedule, path in plans:
            key = tuple(path)
            label = f"{operator.label()} {schedule.describe(depth)}"
            if deadline is not None and time.monotonic() > deadline:
                say(f"  {label} skipped: time budget")
                skipped = Variant(label, path, None, None, error=SKIPPED)
                report.rows.append(BenchRow(operator.label(), schedule, depth, baseline, report.ideals.get(key, skipped), skipped))
                if on_update is not None:
                    on_update(report)
                continue
            if key not in report.ideals:
                if key == tuple(full_path):
                    report.ideals[key] = baseline  # nothing reduced: the ideal is the baseline
                else:
                    patch(model, make_operator(IDEAL_OP), schedule=ideal_schedule(path))
                    report.ideals[key] = measure(f"ideal {_describe_path(path)}")
                    unpatch(model)
            try:
                patch(model, operator, schedule=schedule, prop_attn=prop_attn, seed=seed)
                result = measure(label)
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                if errors == "raise":
                    raise
                message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
                say(f"  {label} failed: {message}")
                result = Variant(label, path, None, None, error=message)
            finally:
                unpatch(model)
            report.rows.append(BenchRow(operator.label(), schedule, depth, baseline, report.ideals[key], result))
            if on_update is not None:
                on_update(report)
    finally:
        unpatch(model)
        if settings.compile:
            torch._dynamo.reset()
    return report


def _full_path(model: nn.Module) -> list[int]:
    """Patch tokens after each block of the unpatched model: all of them, everywhere."""
    grid = getattr(model.patch_embed, "grid_size", None)
    n = grid[0] * grid[1] if grid else model.patch_embed.num_patches
    return [int(n)] * len(model.blocks)


def _describe_path(path: Sequence[int]) -> str:
    counts = [path[0]] + [b for a, b in zip(path, path[1:]) if b != a]
    return "→".join(map(str, counts))
