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
(CUDA kernels are asynchronous); throughput is the median run. In eager mode the runs are
interleaved (round r times every variant once), so a drift in the machine's speed cannot favour
the variants timed last; compiled variants are compiled and timed one after the other (keeping
every compiled variant alive at once would cost memory and dynamo cache entries). The baseline
is measured once per call and each distinct ideal token path once, shared by the operators.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence

import torch
from torch import nn

from .device import device_name, dtype_label, resolve_amp, resolve_device, steady_host_allocator, synchronize
from .errors import TpoolError
from .output import token_path as describe_tokens
from .ops import TokenOperator, make_operator
from .patch import patch, planned_counts, unpatch
from .schedule import Schedule
from .speedflags import machine_load, speed_flag, spread

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
IDEAL_OP = "drop"
SKIPPED = "skipped: time budget"
# (batch size, warm-up calls, timed calls per run) when not given: the setting on CUDA,
# something that ends on a CPU
TIMING_DEFAULTS = {"cuda": (256, 10, 50), "cpu": (8, 3, 5)}


def timing_defaults(device: torch.device) -> tuple[int, int, int]:
    """(batch size, warm-up, steps) that ``tpool bench`` uses on ``device`` unless told otherwise."""
    return TIMING_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]


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
    """Throughput of one model variant: its timed runs (filled in as they happen)."""

    batch_size: int
    first_call_s: float  # the first forward alone: includes compilation when compiled
    runs_img_per_s: list[float] = field(default_factory=list)  # one per repeat, in order (the spread is the noise)
    graphs: Optional[int] = None  # compiled: graphs the first call produced (1 = no graph break)
    recompiled: Optional[int] = None  # compiled: graphs compiled after the first call (should be 0)

    @property
    def img_per_s(self) -> Optional[float]:
        """Median over the runs so far."""
        return statistics.median(self.runs_img_per_s) if self.runs_img_per_s else None

    @property
    def ms_per_batch(self) -> Optional[float]:
        rate = self.img_per_s
        return 1000.0 * self.batch_size / rate if rate else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "img_per_s": _round(self.img_per_s),
            "runs_img_per_s": [round(r, 3) for r in self.runs_img_per_s],
            "ms_per_batch": _round(self.ms_per_batch, 4),
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
    # how to rebuild it (None: the unpatched model)
    operator: Optional[TokenOperator] = field(default=None, repr=False)
    schedule: Optional[Schedule] = field(default=None, repr=False)
    prop_attn: Optional[bool] = None

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

        def ratio(a: Variant, b: Variant) -> Optional[float]:
            if not (a.timing and b.timing):
                return None
            # eager runs are interleaved round by round, so run r of A and of B are neighbours; compiled
            # variants are timed one after the other, where pairing by index means nothing
            value = paired_ratio(a.timing.runs_img_per_s, b.timing.runs_img_per_s, paired=not settings.compile)
            return round(value, 4) if value is not None else None

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
            "op_vs_baseline": ratio(self.operator, self.baseline),
            "op_vs_ideal": ratio(self.operator, self.ideal),
            "ideal_vs_baseline": ratio(self.ideal, self.baseline),
            "baseline_gmacs": _round(self.baseline.gmacs, 6),
            "ideal_gmacs": _round(self.ideal.gmacs, 6),
            "op_gmacs": _round(self.operator.gmacs, 6),
            "baseline_compile_s": compile_s(self.baseline),
            "ideal_compile_s": compile_s(self.ideal),
            "op_compile_s": compile_s(self.operator),
            "op_ms_per_batch": _round(self.operator.timing.ms_per_batch, 4) if self.operator.timing else None,
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
    load: Optional[dict[str, Any]] = None  # the machine's load when the timing ended (speedflags.machine_load)

    def payload(self, model_name: str) -> dict[str, Any]:
        """Everything, JSON-able: the environment, the settings, the shared variants and the rows.

        Each row and the baseline carry the spread of their timed runs and the speed flag
        (speedflags.py, the same fields as a sweep's bench rows: ``bench_spread``, ``bench_load``,
        ``bench_flag``), so a noisy figure or a busy machine is said next to the number."""
        extra = self.row_context(model_name)
        rows = [r.row(self.settings, extra) for r in self.rows]
        for row in rows:
            row.update(self.speed_fields(row["op_runs_img_s"]))
        base_runs = self.baseline.timing.runs_img_per_s if self.baseline.timing else None
        return {
            **extra,
            "torch": torch.__version__,
            "settings": asdict(self.settings),
            "baseline": {**self.baseline.as_dict(), **self.speed_fields(base_runs)},
            "ideals": [v.as_dict() for v in self.ideals.values()],
            "results": rows,
        }

    def speed_fields(self, runs: Optional[Sequence[float]]) -> dict[str, Any]:
        """``bench_spread``, ``bench_load``, ``bench_flag`` of a figure from its per-repeat img/s."""
        value = spread(runs)
        return {"bench_spread": value, "bench_load": self.load, "bench_flag": speed_flag(value, self.load)}

    def row_context(self, model_name: str) -> dict[str, Any]:
        s = self.settings
        return {
            "model": model_name,
            "img_size": self.img_size,
            "batch_size": s.batch_size,
            "device": str(self.device),
            "device_name": self.device_name,
            "amp": dtype_label(self.amp),
            "compile": s.compile,
            "compile_mode": s.compile_mode if s.compile else None,
        }


def paired_ratio(a: Sequence[float], b: Sequence[float], paired: bool = True) -> Optional[float]:
    """Speed of A relative to B: the median over rounds of A's run / B's run in the same round.

    In eager mode round r times every variant once, one after the other (:meth:`_Bench.rounds`),
    so the two runs of a pair are seconds apart and a change of the machine's speed between
    rounds (another job starting) cancels in their ratio; the ratio of the two medians would
    keep it. ``paired=False`` (compiled variants, timed back to back, not in rounds) and runs of
    unequal count (a variant that failed part-way) give the ratio of the medians.
    """
    if not a or not b or min(b) <= 0:
        return None
    if not paired or len(a) != len(b):
        return statistics.median(a) / statistics.median(b)
    return statistics.median(x / y for x, y in zip(a, b))


def _round(value: Optional[float], digits: int = 3) -> Optional[float]:
    return None if value is None else round(value, digits)


# ---------------------------------------------------------------------------------------------
# Timing


def start_variant(
    model: nn.Module, x: torch.Tensor, settings: BenchSettings, amp: Optional[torch.dtype]
) -> tuple[Callable[[torch.Tensor], Any], Timing]:
    """Make the callable to time (compiled under ``settings.compile``), run its first call alone, warm it up.

    Dynamo's caches are cleared before compiling: the variants share code objects (the patched
    block's forward), and their graphs would otherwise pile up against its recompile limit.
    """
    fn: Callable[[torch.Tensor], Any] = model
    if settings.compile:
        torch._dynamo.reset()
        mode = None if settings.compile_mode == "default" else settings.compile_mode
        fn = torch.compile(model, mode=mode, backend=settings.compile_backend, dynamic=False)
    graphs_before = _compiled_graphs()
    with torch.no_grad(), _autocast(x.device, amp):
        synchronize(x.device)
        start = time.perf_counter()
        fn(x)
        synchronize(x.device)
        timing = Timing(batch_size=int(x.shape[0]), first_call_s=time.perf_counter() - start)
        if settings.compile:
            timing.graphs = _compiled_graphs() - graphs_before
        for _ in range(settings.warmup):
            fn(x)
    return fn, timing


def timed_run(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, steps: int, amp: Optional[torch.dtype]) -> float:
    """Images per second over ``steps`` calls, the device synchronised before reading the clock at both ends."""
    with torch.no_grad(), _autocast(x.device, amp):
        synchronize(x.device)
        start = time.perf_counter()
        for _ in range(steps):
            fn(x)
        synchronize(x.device)
        return steps * x.shape[0] / (time.perf_counter() - start)


def time_forward(model: nn.Module, x: torch.Tensor, settings: BenchSettings, amp: Optional[torch.dtype]) -> Timing:
    """First call, warm-up and ``settings.repeats`` timed runs of one model, back to back."""
    fn, timing = start_variant(model, x, settings, amp)
    graphs = _compiled_graphs()
    for _ in range(settings.repeats):
        timing.runs_img_per_s.append(timed_run(fn, x, settings.steps, amp))
    if settings.compile:
        timing.recompiled = _compiled_graphs() - graphs
    return timing


def _autocast(device: torch.device, amp: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


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
    with torch.no_grad(), _autocast(x.device, amp):
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
    prop_attn: Optional[bool] = None,
    seed: int = 0,
    errors: Literal["raise", "record"] = "raise",
    count_gmacs: bool = True,
    progress: Optional[Callable[[str], None]] = None,
    deadline: Optional[float] = None,
    on_update: Optional[Callable[[BenchReport], None]] = None,
) -> BenchReport:
    """Time the baseline, then each (operator, schedule) with its ideal, on ``model`` (moved to ``device``).

    Steps: plan every configuration's token path (:meth:`_Bench.plan`, which validates them all
    before anything is timed), prepare the baseline, then each operator with its ideal
    (:meth:`_Bench.add_row`), then in eager mode the interleaved timed rounds (:meth:`_Bench.rounds`).

    Args:
        model: patched in place for each variant and left unpatched (in eval mode, on the device).
        configs: the (operator, schedule) pairs to time.
        settings: batch, precision, compilation and the number of calls.
        device: 'auto', 'cuda', 'cpu' or a device.
        prop_attn: applies to the operators, not to the ideal (whose attention stays unbiased, the
            fastest kind).
        seed: the seed of the ``random`` operator.
        errors: "record" turns an operator that fails (in patching, tracing or running) into a
            row with its error instead of stopping the run; mistakes in the request (a schedule
            the model cannot take) are still raised before anything is timed.
        count_gmacs: count fvcore GMACs of each variant.
        progress: called with a line of text for each step.
        deadline: a ``time.monotonic()`` value bounding scripts: no variant starts after it, and the
            rows left get the error "skipped: time budget".
        on_update: called with the report after the baseline, after each row and after each timed
            round (scripts save partial results).
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if dev.type == "cpu":
        steady_host_allocator()  # otherwise a variant's speed depends on what ran before it (see device.py)
    unpatch(model)
    model.eval().to(dev)
    run = _Bench(model, settings, dev, resolve_amp(settings.amp, dev), seed, errors, count_gmacs, progress or (lambda m: None))
    plans = run.plan(configs, prop_attn)
    try:
        report = run.start(on_update)
        for operator, schedule, path in plans:
            run.add_row(report, operator, schedule, path, prop_attn, deadline)
            if on_update is not None:
                on_update(report)
        if not settings.compile:
            run.rounds(report, deadline, on_update)
        report.load = machine_load(dev.type, torch.get_num_threads() if dev.type == "cpu" else None, dev.index or 0)
    finally:
        unpatch(model)
        if settings.compile:
            torch._dynamo.reset()
    return report


class _Bench:
    """One :func:`bench` call: the model, the synthetic batch, and how each variant is prepared and timed."""

    def __init__(
        self, model: nn.Module, settings: BenchSettings, dev: torch.device, amp: Optional[torch.dtype], seed: int,
        errors: str, count_gmacs: bool, say: Callable[[str], None],
    ) -> None:
        self.model, self.settings, self.dev, self.amp, self.seed = model, settings, dev, amp, seed
        self.errors, self.count_gmacs, self.say = errors, count_gmacs, say
        self.depth = len(model.blocks)
        self.interleave = not settings.compile  # eager: timed runs interleaved over the variants
        try:
            self.x = synthetic_batch(model, settings.batch_size, settings.img_size, dev)
        except RuntimeError as exc:  # out of memory, typically: the user's batch size, not a bug
            raise TpoolError(f"cannot allocate a synthetic batch of {settings.batch_size} images: {str(exc).splitlines()[0][:200]}") from None
        self.img_size = int(self.x.shape[-1])
        self.full_path = _full_path(model)
        self.variants: list[Variant] = []  # every prepared variant, in the order the rounds time them

    def plan(
        self, configs: Sequence[tuple[TokenOperator, Schedule]], prop_attn: bool
    ) -> list[tuple[TokenOperator, Schedule, list[int]]]:
        """Validate every request and find its token path, before any timing."""
        plans = []
        for operator, schedule in configs:
            patch(self.model, operator, schedule=schedule, prop_attn=prop_attn, seed=self.seed)
            plans.append((operator, schedule, token_path(self.model)))
            unpatch(self.model)
        return plans

    def apply(self, v: Variant) -> None:
        if v.operator is not None:
            patch(self.model, v.operator, schedule=v.schedule, prop_attn=v.prop_attn, seed=self.seed)

    def fail(self, v: Variant, exc: Exception) -> None:
        if self.errors == "raise":
            raise exc
        text = str(exc).strip()
        v.error = f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"
        v.timing = None
        self.say(f"  {v.label} failed: {v.error}")

    def prepare(self, v: Variant) -> None:
        """GMACs, first call and warm-up; back-to-back timed runs too unless they are interleaved."""
        try:
            self.apply(v)
            v.gmacs = _gmacs(self.model, self.img_size, self.say) if self.count_gmacs else None
            self.say(f"{'compiling and timing' if self.settings.compile else 'warming up'} {v.label}")
            if self.interleave:
                v.timing = start_variant(self.model, self.x, self.settings, self.amp)[1]
            else:
                v.timing = time_forward(self.model, self.x, self.settings, self.amp)
                self.say(f"  {v.label}: {v.timing.img_per_s:,.1f} img/s, first call {v.timing.first_call_s:.1f} s")
        except Exception as exc:  # noqa: BLE001 - recorded (or re-raised) by fail()
            self.fail(v, exc)
        finally:
            unpatch(self.model)
        self.variants.append(v)

    def start(self, on_update: Optional[Callable[[BenchReport], None]]) -> BenchReport:
        """Prepare the baseline (it must run) and open the report."""
        baseline = Variant("baseline", self.full_path, None, None)
        self.prepare(baseline)
        if baseline.error:
            raise TpoolError(f"the unpatched model does not run: {baseline.error}")
        report = BenchReport(self.settings, self.dev, device_name(self.dev), self.img_size, self.amp, baseline, {})
        if on_update is not None:
            on_update(report)
        return report

    def ideal(self, report: BenchReport, path: list[int]) -> Variant:
        """The ideal of a token path, prepared once per distinct path (the baseline when nothing is reduced)."""
        key = tuple(path)
        if key not in report.ideals:
            if key == tuple(self.full_path):
                report.ideals[key] = report.baseline  # nothing reduced: the ideal is the baseline
            else:
                ideal = Variant(f"ideal {describe_tokens(path)}", path, None, None,
                                operator=make_operator(IDEAL_OP), schedule=ideal_schedule(path))
                self.prepare(ideal)
                report.ideals[key] = ideal
        return report.ideals[key]

    def add_row(
        self, report: BenchReport, operator: TokenOperator, schedule: Schedule, path: list[int], prop_attn: bool,
        deadline: Optional[float],
    ) -> None:
        """Prepare one operator at one schedule (and its ideal), or mark it skipped past the deadline."""
        label = f"{operator.label()} {schedule.describe(self.depth)}"
        result = Variant(label, path, None, None, operator=operator, schedule=schedule, prop_attn=prop_attn)
        if deadline is not None and time.monotonic() > deadline:
            self.say(f"  {label} skipped: time budget")
            result.error = SKIPPED
            ideal = report.ideals.get(tuple(path), Variant(f"ideal {describe_tokens(path)}", path, None, None, error=SKIPPED))
        else:
            ideal = self.ideal(report, path)
            self.prepare(result)
        report.rows.append(BenchRow(operator.label(), schedule, self.depth, report.baseline, ideal, result))

    def rounds(
        self, report: BenchReport, deadline: Optional[float], on_update: Optional[Callable[[BenchReport], None]]
    ) -> None:
        """Eager: one timed run of every variant per round, so that drift in the machine's speed
        (clocks, other load) spreads over all variants instead of biasing the last ones."""
        settings = self.settings
        for round_index in range(settings.repeats):
            if round_index > 0 and deadline is not None and time.monotonic() > deadline:
                self.say(f"time budget: stopping after {round_index} timed round(s)")
                break
            self.say(f"timed round {round_index + 1}/{settings.repeats}")
            for v in self.variants:
                if v.timing is None:
                    continue
                try:
                    self.apply(v)  # eager: re-patching is a cheap swap of wrapper modules, no warm-up lost
                    v.timing.runs_img_per_s.append(timed_run(self.model, self.x, settings.steps, self.amp))
                except Exception as exc:  # noqa: BLE001
                    self.fail(v, exc)
                finally:
                    unpatch(self.model)
            if on_update is not None:
                on_update(report)
        for v in self.variants:
            if v.timing is not None:
                self.say(f"  {v.label}: {v.timing.img_per_s:,.1f} img/s")


def _full_path(model: nn.Module) -> list[int]:
    """Patch tokens after each block of the unpatched model: all of them, everywhere."""
    grid = getattr(model.patch_embed, "grid_size", None)
    n = grid[0] * grid[1] if grid else model.patch_embed.num_patches
    return [int(n)] * len(model.blocks)


