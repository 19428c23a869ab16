#!/usr/bin/env python
"""Issue 7's wall-clock table for every registered operator: baseline, ideal, operator; eager and compiled.

On CUDA the defaults are the issue's setting: DeiT-S, batch 256, bf16 autocast, reduction at
blocks 3, 6, 9 (the model's default layers), keep 0.7 and 0.5, eager and ``torch.compile``
(mode default). The same script runs on a CPU with a small batch:

    python benchmarks/gpu.py                                   # CUDA, everything, Markdown on stdout
    python benchmarks/gpu.py --device cpu --batch-size 4 --model deit_tiny_patch16_224
    python benchmarks/gpu.py --mode eager --out OUT            # one half; writes OUT/eager.json, OUT/gpu.md
    python benchmarks/gpu.py --mode compile --out OUT --skip-failed OUT/eager.json --time-budget 150
    python benchmarks/gpu.py --render --out OUT                # the Markdown from whatever OUT holds

Each mode writes its JSON after every row and re-renders OUT/gpu.md, so a run cut short by a
timeout still leaves every row it finished. ``--time-budget`` stops starting new variants after
that many seconds (compilation takes tens of seconds per variant on a GPU machine); operators run
in ``--priority`` order, all at the first keep rate before any at the second. In eager mode on
CUDA every operator is also run once under CUDA's sync debug mode ("error"): the "sync-free"
column says whether its forward synchronised with the host.

Throughput is the median of ``--repeats`` runs of ``--steps`` calls, device synchronised at both
ends; compile time (the first call) is reported apart and excluded. Random weights, random input.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = ("eager", "compile")
NOT_METHODS = ("none", "drop")  # the baseline and the ideal are columns of their own
# the operators the calibration names first, then the rest in registry order
DEFAULT_PRIORITY = "topk,wkmedoids,tome,evit,kmedoids,wkmeans,kmeans,random,grid"
GOAL_VS_IDEAL = 0.9


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 on CUDA, 8 on CPU")
    p.add_argument("--amp", default=None, help="bf16, fp16 or none (default bf16 on CUDA, none on CPU)")
    p.add_argument("--keep", default="0.7,0.5")
    p.add_argument("--layers", default=None, help="reduction blocks (default the model's: 3,6,9 on 12 blocks)")
    p.add_argument("--ops", default=None, help="operators (default: every registered one but none/drop)")
    p.add_argument("--priority", default=DEFAULT_PRIORITY, help="order to run operators in; unlisted ones follow")
    p.add_argument("--mode", default="both", choices=("eager", "compile", "both"))
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--compile-backend", default="inductor", help="aot_eager for a quick check of the script")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default the model's)")
    p.add_argument("--warmup", type=int, default=None, help="default 10 on CUDA, 3 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed calls per repeat (default 30 on CUDA, 3 on CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--time-budget", type=float, default=None, help="seconds per mode after which no variant starts")
    p.add_argument("--skip-failed", type=Path, default=None, help="eager JSON: do not compile operators that failed there")
    p.add_argument("--no-sync-check", action="store_true", help="skip the CUDA sync debug check (eager mode)")
    p.add_argument("--no-gmacs", action="store_true", help="do not count GMACs (needs fvcore)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="folder for eager.json, compile.json and gpu.md")
    p.add_argument("--render", action="store_true", help="only render OUT/gpu.md from the JSON files in --out")
    return p.parse_args(argv)


START = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr with wall-clock time and seconds since start (the GPU script reads these)."""
    now = dt.datetime.now().strftime("%H:%M:%S")
    print(f"[{now} +{time.monotonic() - START:6.1f}s] {message}", file=sys.stderr, flush=True)


def operator_order(requested: Optional[str], priority: str) -> list[str]:
    from tpool_cli.ops import operator_names

    registered = [op for op in operator_names() if op not in NOT_METHODS]
    if requested:
        wanted = [op.strip() for op in requested.split(",") if op.strip()]
        unknown = [op for op in wanted if op not in registered]
        if unknown:
            raise SystemExit(f"error: unknown operator(s) {', '.join(unknown)}; registered: {', '.join(registered)}")
        return wanted
    first = [op for op in priority.split(",") if op in registered]
    return first + [op for op in registered if op not in first]


def failed_ops(path: Optional[Path]) -> set[str]:
    """Operators with a failed row in an earlier (eager) payload."""
    if path is None or not path.is_file():
        return set()
    payload = json.loads(path.read_text())
    return {r["op"] for r in payload.get("results", []) if r.get("error") and not r["error"].startswith("skipped")}


def run_mode(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    import torch

    from tpool_cli.bench import BenchSettings, bench, check_sync_free, synthetic_batch
    from tpool_cli.device import resolve_amp, resolve_device
    from tpool_cli.models import load_model
    from tpool_cli.ops import make_operator
    from tpool_cli.patch import patch, unpatch
    from tpool_cli.schedule import Schedule, parse_float_list, parse_int_list

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    settings = BenchSettings(
        batch_size=args.batch_size or (256 if cuda else 8),
        amp=args.amp,
        compile=mode == "compile",
        compile_mode=args.compile_mode,
        compile_backend=args.compile_backend,
        img_size=args.img_size,
        warmup=args.warmup if args.warmup is not None else (10 if cuda else 3),
        steps=args.steps if args.steps is not None else (30 if cuda else 3),
        repeats=args.repeats,
    )
    amp = resolve_amp(args.amp, device)
    ops = operator_order(args.ops, args.priority)
    skip = failed_ops(args.skip_failed) if mode == "compile" else set()
    if skip:
        log(f"{mode}: not compiling {', '.join(sorted(skip))} (failed in eager)")
    keeps = parse_float_list(args.keep, "--keep")
    layers = parse_int_list(args.layers, "--layers")
    # all operators at the first keep rate before any at the next: a time budget cuts the least wanted
    configs = [(make_operator(op), Schedule(keep=keep, layers=layers)) for keep in keeps for op in ops if op not in skip]
    model = load_model(args.model, random_init=True, img_size=args.img_size).model
    extras: dict[str, Any] = {"mode": mode, "started": dt.datetime.now().isoformat(timespec="seconds"),
                              "skipped_after_eager_failure": sorted(skip), "sync_check": {}, "finished": False}
    if cuda:
        extras["gpu"] = torch.cuda.get_device_name(device)
    elif hasattr(os, "getloadavg"):
        extras["loadavg_at_start"] = [round(v, 2) for v in os.getloadavg()]  # a shared CPU's numbers need this
    out_json = args.out / f"{mode}.json" if args.out else None

    if mode == "eager" and cuda and not args.no_sync_check:
        x = synthetic_batch(model.to(device), settings.batch_size, args.img_size, device)
        for label, op in [("baseline", None)] + [(op, op) for op in ops]:
            try:
                if op is not None:
                    patch(model, op, keep=keeps[0], layers=layers)
                extras["sync_check"][label] = check_sync_free(model, x, amp)
            except Exception as exc:  # noqa: BLE001 - a failing operator shows in its timing row too
                extras["sync_check"][label] = f"could not run: {type(exc).__name__}: {str(exc).strip()[:200]}"
            finally:
                unpatch(model)
            log(f"sync check {label}: {extras['sync_check'][label] or 'sync-free'}")
        del x

    def save(report) -> None:
        if out_json is None:
            return
        payload = {**report.payload(args.model), **extras, "elapsed_s": round(time.monotonic() - mode_start, 1)}
        _write(out_json, json.dumps(payload, indent=1, default=str))
        _write(args.out / "gpu.md", render(load_payloads(args.out)))

    mode_start = time.monotonic()
    deadline = mode_start + args.time_budget if args.time_budget else None
    log(f"{mode}: {args.model}, batch {settings.batch_size}, {device}, {len(configs)} operator runs")
    report = bench(model, configs, settings, device, errors="record", count_gmacs=not args.no_gmacs,
                   progress=log, deadline=deadline, on_update=save)
    extras["finished"] = True
    save(report)
    return {**report.payload(args.model), **extras, "elapsed_s": round(time.monotonic() - mode_start, 1)}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def load_payloads(folder: Path) -> dict[str, dict[str, Any]]:
    payloads = {}
    for mode in MODES:
        path = folder / f"{mode}.json"
        if path.is_file():
            try:
                payloads[mode] = json.loads(path.read_text())
            except json.JSONDecodeError:
                log(f"ignoring unreadable {path}")
    return payloads


# ---------------------------------------------------------------------------------------------
# Markdown


def _rate(value: Optional[float]) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if value >= 1000 else f"{value:.1f}"


def _ratio(value: Optional[float], goal: Optional[float] = None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" + (" ✗" if goal is not None and value < goal else "")


def _path(path: list[int]) -> str:
    counts = [path[0]] + [b for a, b in zip(path, path[1:]) if b != a]
    return "→".join(map(str, counts))


def render(payloads: dict[str, dict[str, Any]]) -> str:
    """One Markdown table: baseline, then per keep rate the ideal(s) and every operator, eager | compiled."""
    if not payloads:
        return "no results\n"
    any_payload = next(iter(payloads.values()))
    eager, compiled = payloads.get("eager"), payloads.get("compile")
    lines = [
        f"### {any_payload['model']} @ {any_payload['img_size']} px, batch {any_payload['batch_size']}, "
        f"amp {any_payload['amp']}: {any_payload['device_name']}",
        "",
        f"torch {any_payload['torch']}; "
        + "; ".join(
            f"{mode}: median of {p['settings']['repeats']} runs of {p['settings']['steps']} calls after "
            f"{p['settings']['warmup']} warm-up calls" + (f", torch.compile mode {p['settings']['compile_mode']}" if mode == "compile" else "")
            for mode, p in payloads.items()
        )
        + ". Compile time (first call) is excluded from throughput. op/ideal below 0.9 and op/baseline below 1.0 are marked ✗.",
        "",
        "| variant | keep | patch tokens | GMACs | eager img/s | eager vs baseline | eager vs ideal | "
        "compiled img/s | compiled vs baseline | compiled vs ideal | compile s | sync-free |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def rows_of(payload: Optional[dict]) -> dict[tuple[str, str], dict]:
        return {(r["op"], r["schedule"]): r for r in payload["results"]} if payload else {}

    e_rows, c_rows = rows_of(eager), rows_of(compiled)
    keys = list(dict.fromkeys(list(e_rows) + list(c_rows)))
    sync = (eager or {}).get("sync_check", {})

    def sync_cell(label: str) -> str:
        if not sync or label not in sync:
            return ""
        return "yes" if sync[label] is None else f"no: {sync[label]}"

    def rate_cell(row: Optional[dict], key: str) -> str:
        if row is None:
            return ""
        if row.get("error") and key == "op_img_s":
            return "skipped" if row["error"].startswith("skipped") else "failed"
        return _rate(row.get(key))

    eb, cb = (eager or {}).get("baseline"), (compiled or {}).get("baseline")
    lines.append(
        f"| baseline | 1 | {_path((eb or cb)['tokens_per_block'])} | {_gmacs((eb or {}).get('gmacs') or (cb or {}).get('gmacs'))} | "
        f"{_rate((eb or {}).get('img_per_s'))} | {'1.00' if (eb or {}).get('img_per_s') else ''} | | "
        f"{_rate((cb or {}).get('img_per_s'))} | {'1.00' if (cb or {}).get('img_per_s') else ''} | | "
        f"{_secs((cb or {}).get('first_call_s'))} | {sync_cell('baseline')} |"
    )
    by_keep: dict[Any, list[tuple[str, str]]] = {}
    for key in keys:
        row = e_rows.get(key) or c_rows.get(key)
        by_keep.setdefault(row["keep"], []).append(key)
    failures = []
    for keep, keys_of_keep in by_keep.items():
        seen_paths: list[tuple] = []
        for key in keys_of_keep:  # the ideal rows first: one per distinct token path
            e, c = e_rows.get(key), c_rows.get(key)
            row = e or c
            path = tuple(row["tokens_per_block"])
            if path in seen_paths or (e or {}).get("ideal_img_s") is None and (c or {}).get("ideal_img_s") is None:
                continue
            seen_paths.append(path)
            users = [k[0] for k in keys_of_keep if tuple((e_rows.get(k) or c_rows.get(k))["tokens_per_block"]) == path]
            label = "ideal (free reduction)" if len(seen_paths) == 1 else f"ideal at {', '.join(users)}'s counts"
            lines.append(
                f"| {label} | {keep} | {_path(list(path))} | {_gmacs(row.get('ideal_gmacs'))} | {rate_cell(e, 'ideal_img_s')} | "
                f"{_ratio((e or {}).get('ideal_vs_baseline'))} | {_one(e)} | {rate_cell(c, 'ideal_img_s')} | "
                f"{_ratio((c or {}).get('ideal_vs_baseline'))} | {_one(c)} | {_secs((c or {}).get('ideal_compile_s'))} | |"
            )
        for key in keys_of_keep:
            e, c = e_rows.get(key), c_rows.get(key)
            row = e or c
            lines.append(
                f"| {key[0]} | {keep} | {_path(row['tokens_per_block'])} | {_gmacs(row.get('op_gmacs'))} | "
                f"{rate_cell(e, 'op_img_s')} | {_ratio((e or {}).get('op_vs_baseline'), 1.0)} | "
                f"{_ratio((e or {}).get('op_vs_ideal'), GOAL_VS_IDEAL)} | {rate_cell(c, 'op_img_s')} | "
                f"{_ratio((c or {}).get('op_vs_baseline'), 1.0)} | {_ratio((c or {}).get('op_vs_ideal'), GOAL_VS_IDEAL)} | "
                f"{_secs((c or {}).get('op_compile_s'))}{_graphs(c)} | {sync_cell(key[0]) if keep == list(by_keep)[0] else ''} |"
            )
            for mode, r in (("eager", e), ("compiled", c)):
                if r and r.get("error") and not r["error"].startswith("skipped"):
                    failures.append(f"- {key[0]} {key[1]} ({mode}): {r['error']}")
    notes = []
    for mode, payload in payloads.items():
        state = "finished" if payload.get("finished") else "cut short (partial)"
        notes.append(f"{mode}: {state} in {payload.get('elapsed_s', '?')} s")
        if payload.get("loadavg_at_start"):
            notes.append(f"{mode} CPU load average at start {payload['loadavg_at_start'][0]}")
        if payload.get("skipped_after_eager_failure"):
            notes.append(f"not compiled (failed in eager): {', '.join(payload['skipped_after_eager_failure'])}")
    lines += ["", "; ".join(notes) + "."]
    if failures:
        lines += ["", "Failures:", *failures]
    return "\n".join(lines) + "\n"


def _one(row: Optional[dict]) -> str:
    return "1.00" if row and row.get("ideal_img_s") is not None else ""


def _gmacs(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.3f}"


def _secs(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _graphs(row: Optional[dict]) -> str:
    """Flag compiled runs that were not one graph, or that recompiled while being timed."""
    if not row or row.get("op_graphs") in (None, 1) and not row.get("op_recompiled"):
        return ""
    return f" ({row.get('op_graphs')} graphs, {row.get('op_recompiled')} recompiles)"


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.render:
        if args.out is None:
            raise SystemExit("error: --render needs --out")
        text = render(load_payloads(args.out))
        _write(args.out / "gpu.md", text)
        sys.stdout.write(text)
        return
    from tpool_cli.errors import TpoolError

    payloads = {}
    modes = MODES if args.mode == "both" else (args.mode,)
    try:
        for mode in modes:
            payloads[mode] = run_mode(args, mode)
    except TpoolError as exc:
        raise SystemExit(f"error: {exc}") from None
    text = render(load_payloads(args.out) if args.out else payloads)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
