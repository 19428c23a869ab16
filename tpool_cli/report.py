"""Tables, Markdown and plots of a sweep, rebuilt from ``results.jsonl`` alone.

Everything here is a function of result rows (the dicts :mod:`tpool_cli.sweep` appends), so
``tpool report OUT`` reproduces byte for byte what ``tpool pareto`` wrote. The Pareto frontier is
the pure function :func:`frontier_mask`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from .errors import TpoolError
from .store import write_text
from .report_marks import (
    RANKING_HEADERS, Coverage, add_text_columns, add_uncertainty, coverage, mark_capped, mark_speed, ranking,
)
from .style import finetuned_label, is_finetuned_label, op_name, op_style, variant_linestyle

DROPS = (0.5, 1.0, 2.0)  # top-1 points the "GMACs saved" table allows to lose
RUN_FIELDS = ("model", "weights_sha256", "weights", "data_fingerprint", "img_size", "dtype", "device")
PLOTS = ("top1_vs_gmacs", "top1_vs_speed")


def frontier_mask(costs: Sequence[float], values: Sequence[float]) -> list[bool]:
    """Which points are Pareto-optimal when lower cost and higher value are better.

    A point is on the frontier unless another point is at least as good in both and strictly
    better in one. Ties: points with identical (cost, value) do not dominate each other, so
    duplicates of a frontier point are all on it. NaN/None in either coordinate: never on it.
    """
    if len(costs) != len(values):
        raise ValueError("costs and values differ in length")
    valid = [c is not None and v is not None and not (math.isnan(c) or math.isnan(v)) for c, v in zip(costs, values)]
    order = sorted((i for i in range(len(costs)) if valid[i]), key=lambda i: (costs[i], -values[i]))
    mask = [False] * len(costs)
    best = -math.inf  # best value among strictly cheaper points
    i = 0
    while i < len(order):
        # a group of equal cost: only its best value can be optimal, and only if it beats `best`
        j = i
        while j < len(order) and costs[order[j]] == costs[order[i]]:
            j += 1
        top = values[order[i]]
        if top > best:
            for k in order[i:j]:
                mask[k] = values[k] == top
            best = top
        i = j
    return mask


def run_id(row: dict[str, Any]) -> tuple:
    """What makes rows comparable: same model, weights, data, resolution, dtype, device."""
    return tuple(row.get(k) for k in RUN_FIELDS)


def select_run(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The rows of the most recent run configuration (and how many others were left out)."""
    if not rows:
        return [], 0
    current = run_id(rows[-1])
    kept = [r for r in rows if run_id(r) == current]
    return kept, len(rows) - len(kept)


def load_rows(out: Path, log=None, all_rows: bool = False) -> list[dict[str, Any]]:
    """Rows of the latest sweep in ``out``: the points its ``plan.json`` lists, in plan order.

    Reads only (a truncated last line is skipped, not cut). Without a plan (results written by
    hand or by an older tpool), the rows of the most recent run configuration. When the plan has
    bench keys (``tpool pareto --bench``), each row gets its figures from ``bench.jsonl``.
    ``all_rows`` (``tpool report --all``): every row of results.jsonl, in file order. Rows left
    out are counted in one logged line.
    """
    from .store import PLAN_FILE, RESULTS_FILE, ResultsStore, merge_bench, read_bench

    path = Path(out) / RESULTS_FILE
    if not path.is_file():
        raise TpoolError(f"no {RESULTS_FILE} in {out}: run `tpool pareto --out {out}` first")
    store = ResultsStore(path, log) if log else ResultsStore(path)
    all_rows_ = store.read(repair=False)
    plan = _read_plan(Path(out) / PLAN_FILE)
    if all_rows:
        rows, others = list(all_rows_), 0
        if plan is not None:
            rows = merge_bench(rows, read_bench(Path(out), plan["bench"], log))
    elif plan is not None:
        by_key = {r.get("key"): r for r in all_rows_}
        rows = [by_key[k] for k in plan["keys"] if k in by_key]
        others = len(all_rows_) - len(rows)
        if not rows:
            rows, others = select_run(all_rows_)
        else:
            rows = merge_bench(rows, read_bench(Path(out), plan["bench"], log))
            if others:
                (log or store.log)(f"{path}: showing the latest plan's {len(rows)} row(s), leaving out {others} "
                                   "of earlier plans (`tpool report --all` shows every row)")
                others = 0
    else:
        rows, others = select_run(all_rows_)
    if not rows:
        raise TpoolError(f"{path} holds no results")
    if others:
        (log or store.log)(f"{path}: left out {others} row(s) of other configurations (model/weights/data/dtype/device)")
    return rows


def _read_plan(path: Path) -> Optional[dict[str, Any]]:
    """{"keys": [point key, ...], "bench": {point key: bench key}} from plan.json, or None."""
    try:
        plan = json.loads(path.read_text())
        keys = plan["keys"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(keys, list):
        return None
    bench = plan.get("bench")
    bench = {k: v for k, v in bench.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(bench, dict) else {}
    return {"keys": [k for k in keys if isinstance(k, str)], "bench": bench}


REQUIRED_COLUMNS = ("op", "schedule", "keep", "top1", "top5", "gmacs", "model_only_img_s")


def results_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per point with the derived columns: drop vs. baseline, GMACs saved, speedup, frontiers."""
    df = pd.DataFrame(rows)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise TpoolError(f"these results lack {', '.join(missing)}: not rows written by `tpool pareto`")
    base = df[df["op"] == "none"]
    if base.empty:
        raise TpoolError("the results have no baseline point (op none)")
    b = base.iloc[0]
    df["op_name"] = df["op"].str.replace(r"\(.*\)$", "", regex=True)
    _label_finetuned(df)
    df["delta_top1"] = (df["top1"] - b["top1"]).round(4)
    df["gmacs_saved_pct"] = (100.0 * (1.0 - df["gmacs"] / b["gmacs"])).round(3)
    if has_bench(df):
        # tpool bench figures: each ratio is against the baseline timed in the same run, so the
        # frontier is drawn on ratios (rows of several bench runs stay comparable)
        df["speedup"] = df["bench_vs_baseline"].astype(float)
        speed = df["speedup"]
    else:
        speed = df["model_only_img_s"].astype(float)
        df["speedup"] = (speed / float(b["model_only_img_s"])).round(4) if _number(b["model_only_img_s"]) else float("nan")
    add_uncertainty(df, b)
    mark_capped(df)  # a capped point equals one of higher keep: drawn once, never on a frontier
    mark_speed(df, has_bench(df))
    add_text_columns(df)
    top1 = df["top1"].astype(float).where(~df["capped"], float("nan"))
    df["frontier"] = frontier_mask(df["gmacs"].tolist(), top1.tolist())
    df["frontier_speed"] = frontier_mask((-speed).tolist(), top1.tolist())
    df["frontier_op"] = False
    for op in ops_of(df):
        idx = df.index[(df["op"] == op) | (df["op"] == "none")]
        mask = frontier_mask(df.loc[idx, "gmacs"].tolist(), top1.loc[idx].tolist())
        op_idx = [i for i, m in zip(idx, mask) if m and df.at[i, "op"] == op]
        df.loc[op_idx, "frontier_op"] = True
    df["_order"] = range(len(df))
    return df.sort_values(["gmacs", "_order"], ascending=[False, True], kind="stable").drop(columns="_order").reset_index(drop=True)


def finetuned_mask(df: pd.DataFrame) -> pd.Series:
    """Rows of fine-tuned points (tpool pareto --finetune-epochs): their record has a recipe."""
    if "finetune" not in df.columns:
        return pd.Series(False, index=df.index)
    return df["finetune"].map(lambda v: isinstance(v, dict) and "recipe" in v)


def _label_finetuned(df: pd.DataFrame) -> None:
    """A fine-tuned point's operator reads 'kmeans +ft 3 ep', so every table, line and frontier per
    operator keeps it apart from the same operator off the shelf (nothing changes without one)."""
    ft = finetuned_mask(df)
    if ft.any():
        df.loc[ft, "op"] = [finetuned_label(op, int(rec["epochs"])) for op, rec in zip(df.loc[ft, "op"], df.loc[ft, "finetune"])]


def has_bench(df: pd.DataFrame) -> bool:
    """Whether the points carry ``tpool pareto --bench`` figures (the baseline's at least)."""
    if "bench_img_s" not in df.columns:
        return False
    base = df[df["op"] == "none"]
    return not base.empty and _number(base.iloc[0]["bench_img_s"])


def bench_settings(df: pd.DataFrame) -> str:
    """How the baseline's bench figure was timed, e.g. 'batch 256, bf16, eager' (comparisons check it)."""
    b = df[df["op"] == "none"].iloc[0]
    return f"batch {int(b['bench_batch_size'])}, {b['bench_dtype']}, {'compiled' if b['bench_compile'] else 'eager'}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value) and value != 0


def ops_of(df: pd.DataFrame) -> list[str]:
    """Operator labels in order of first appearance, baseline excluded."""
    return [op for op in dict.fromkeys(df["op"]) if op != "none"]


def savings(df: pd.DataFrame, drops: Sequence[float] = DROPS) -> pd.DataFrame:
    """Per operator and allowed top-1 drop d: the cheapest point within d points of the baseline."""
    b = df[df["op"] == "none"].iloc[0]
    out = []
    for op in ops_of(df):
        line: dict[str, Any] = {"op": op}
        points = df[df["op"] == op]
        for d in drops:
            ok = points[points["delta_top1"] >= -d - 1e-9]
            if ok.empty or ok["gmacs"].min() >= b["gmacs"]:
                line[f"saved_at_{d:g}"] = None
                line[f"keep_at_{d:g}"] = None
                continue
            best = ok.sort_values(["gmacs", "top1"], ascending=[True, False], kind="stable").iloc[0]
            line[f"saved_at_{d:g}"] = round(float(b["gmacs"] - best["gmacs"]), 6)
            line[f"saved_pct_at_{d:g}"] = round(float(best["gmacs_saved_pct"]), 3)
            line[f"keep_at_{d:g}"] = best["schedule"]
        out.append(line)
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------
# Rendering


TABLE_COLUMNS = [  # (field, header, format); fields with a leading _ are preformatted (report_marks.py)
    ("op", "op", "{}"), ("schedule", "schedule", "{}"), ("gmacs", "GMACs", "{:.4f}"),
    ("gmacs_saved_pct", "GMACs saved %", "{:.1f}"), ("images", "images", "{:.0f}"), ("top1", "top-1", "{:.2f}"),
    ("_top1_ci", "top-1 95% CI", "{}"), ("delta_top1", "Δ top-1", "{:+.2f}"), ("_flips", "flips +/−", "{}"),
    ("_p_base", "p vs. base", "{}"), ("top5", "top-5", "{:.2f}"), ("_top5_ci", "top-5 95% CI", "{}"),
    ("model_only_img_s", "model img/s", "{:,.0f}"), ("_spread", "spread", "{}"), ("speedup", "speedup", "{:.2f}x"),
    ("_notes", "notes", "{}"),
]  # no end-to-end column: sweep points run from the decode-once cache (`tpool evaluate` gives it)
BENCH_COLUMNS = [("bench_img_s", "bench img/s", "{:,.0f}"), ("_spread", "spread", "{}"), ("speedup", "speedup", "{:.2f}x"),
                 ("bench_vs_ideal", "of ideal", "{:.2f}")]


def table_columns(df: pd.DataFrame) -> list[tuple[str, str, str]]:
    """The per-point columns; with bench figures, the speed columns are theirs and "of ideal" is added."""
    if not has_bench(df):
        return TABLE_COLUMNS
    speed = {"model_only_img_s", "_spread", "speedup"}
    columns = [c for c in TABLE_COLUMNS if c[0] not in speed]
    return columns[:-1] + BENCH_COLUMNS + columns[-1:]


def _cell(value: Any, fmt: str = "{}") -> str:
    if isinstance(value, str) and value == "":
        return ""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return fmt.format(value)


def point_table(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of the per-point tables (Markdown and Rich share them)."""
    columns = table_columns(df)
    headers = [h for _, h, _ in columns]
    cells = [[_cell(r[c], f) for c, _, f in columns] for _, r in df.iterrows()]
    return headers, cells


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pareto_markdown(df: pd.DataFrame, cov: Optional[Coverage] = None) -> str:
    """pareto.md: the run, the frontier overall and per operator, GMACs saved, the ranking per
    schedule, all points; a banner when the sweep is partial, a line on the rows left out."""
    cov = cov or Coverage()
    b = df[df["op"] == "none"].iloc[0]
    sha = b.get("weights_sha256")
    weights = str(b["weights"]) + (f" (sha256 `{sha[:12]}`)" if isinstance(sha, str) else "")
    parts = [
        f"# Pareto sweep: {b['model']} @ {b['img_size']}px\n",
        *([f"> **{cov.banner()}**: the sweep was interrupted or is still running; rerun it to complete\n"] if cov.partial else []),
        f"- data: `{b['data']}` ({b['label_space']}), {int(b['images'])} images"
        + (f", {int(b['skipped'])} unreadable files skipped" if int(b.get("skipped") or 0) else "")
        + f", fingerprint `{b['data_fingerprint']}`",
        f"- weights: {weights}" + ("  \n  **random weights: accuracy is meaningless**" if b.get("random_init") else ""),
        f"- device: {b['device_name']}, {b['dtype']}, batch {b['batch_size']}; torch {b['torch']}, timm {b['timm']}",
        f"- baseline: top-1 {b['top1']:.2f}%, {b['gmacs']:.4f} GMACs, "
        + (f"{b['model_only_img_s']:,.0f} img/s model-only{ranks_suffix(df)}" if _number(b["model_only_img_s"]) else "no model-only timing"),
        *([f"- **warning**: {world_size_note(df)}"] if world_size_note(df) else []),
        *_bench_lines(df),
        *_coverage_lines(cov),
        *_finetune_lines(df),
        "",
        "GMACs per image from fvcore (1 multiply-add = 1 MAC); model img/s: forward pass only, device "
        "synchronised, data already on the device" + (" (under torchrun: the sum of the ranks' figures)" if max(world_sizes(df)) > 1 else "")
        + "; Δ top-1 in points vs. the baseline. "
        "95% CI: Wilson score interval of the proportion over the images counted; flips +/−: images "
        "right only with the operator / only without it; p vs. base: McNemar's exact test on those flips "
        "(same images), * below 0.05, (u) unpaired (no per-image record: pooled two-proportion test); "
        "spread: (max − min) / median of the speed figure's repeats. notes: capped (same token counts as "
        "a point of higher keep: drawn once, off the frontiers), speed noisy/busy (do not trust that "
        "speed), unpaired."
        + (" bench img/s: `tpool bench` on a synthetic batch, speedup vs. the baseline and *of ideal* vs. the "
           "same token counts with a free reduction, both timed in the same run." if has_bench(df) else "")
        + "\n",
        "## Pareto frontier (top-1 vs. GMACs)\n",
        markdown_table(*point_table(df[df["frontier"]])),
    ]
    parts.append("## Frontier per operator\n")
    for op in ops_of(df):
        sub = df[(df["frontier_op"] & (df["op"] == op)) | (df["op"] == "none")]
        parts += [f"### {op}\n", markdown_table(*point_table(sub))]
    sav = savings(df)
    parts.append("## GMACs saved at a bounded top-1 drop\n")
    parts.append(
        "Per operator, the cheapest point whose top-1 is at most d points below the baseline "
        f"({b['gmacs']:.4f} GMACs); — when no reducing point qualifies.\n"
    )
    headers = ["op"] + [f"drop ≤ {d:g}" for d in DROPS]
    rows = []
    for _, r in sav.iterrows():
        cells = [r["op"]]
        for d in DROPS:
            saved = r.get(f"saved_at_{d:g}")
            if saved is None or (isinstance(saved, float) and math.isnan(saved)):
                cells.append("—")
            else:
                cells.append(f"{saved:.4f} GMACs ({r[f'saved_pct_at_{d:g}']:.1f}%) at {r[f'keep_at_{d:g}']}")
        rows.append(cells)
    parts.append(markdown_table(headers, rows))
    parts += _ranking_section(df)
    parts += ["## All points\n", markdown_table(*point_table(df))]
    return "\n".join(parts)


def _finetune_lines(df: pd.DataFrame) -> list[str]:
    """What '+ft E ep' means in the tables (none for a sweep off the shelf)."""
    ft = df[finetuned_mask(df)]
    if ft.empty:
        return []
    rec = ft.iloc[0]["finetune"]["recipe"]
    return [
        f"- fine-tuned: {len(ft)} point(s) marked *+ft E ep* were fine-tuned for E epochs with their operator in place "
        f"(`tpool pareto --finetune-epochs`; lr {rec['lr']:g}, batch {rec['batch_size']}, "
        f"{'distilled from the baseline' if rec['distill'] else 'no distillation'}"
        + (f", at most {rec['max_steps']} updates" if rec.get("max_steps") else "")
        + f"; {ft.iloc[0]['finetune'].get('train_files')} training files), the others are off the shelf",
    ]


def _coverage_lines(cov: Coverage) -> list[str]:
    """What the report leaves out of results.jsonl (and how to see it), or that it shows every row."""
    if cov.all_rows:
        return ["- rows: every row of results.jsonl (`tpool report --all`), baseline = its first baseline row"]
    if cov.left_out:
        return [f"- rows: the latest plan's; results.jsonl holds {cov.left_out} more row(s) of other plans "
                "(`tpool report --all OUT` shows every row)"]
    return []


def _ranking_section(df: pd.DataFrame) -> list[str]:
    """Operators ranked at each schedule (near-equal GMACs), each against the leader."""
    lines = ranking(df)
    if not lines:
        return []
    return [
        "## Ranking at each schedule\n",
        "At one schedule the operators keep the same token counts, so their GMACs differ only by the "
        "operator's own cost. Each is compared with the schedule's leader: McNemar's exact test on the "
        "same images (unpaired: pooled two-proportion test, (u)); *significant* at 0.05. A difference "
        "that is not significant is within the noise of this many images.\n",
        markdown_table(RANKING_HEADERS, lines),
    ]


def _bench_lines(df: pd.DataFrame) -> list[str]:
    """The bench settings line of pareto.md (none for a sweep without --bench)."""
    b = df[df["op"] == "none"].iloc[0]
    if not has_bench(df):
        if "bench_run" in df.columns and df["bench_run"].notna().any():  # --bench, but no baseline figure
            error = b.get("bench_error") if isinstance(b.get("bench_error"), str) else "no figure"
            return [f"- bench: **the baseline could not be timed** ({error}): no bench figures; rerun to time it again"]
        return []
    runs = df["bench_run"].dropna().nunique() if "bench_run" in df.columns else 1
    failed = int(df["bench_error"].notna().sum()) if "bench_error" in df.columns else 0
    return [
        f"- bench: {b['bench_img_s']:,.0f} img/s baseline; {bench_settings(df)}, median of {int(b['bench_repeats'])} runs of "
        f"{int(b['bench_steps'])} calls"
        + (f"; figures from {runs} bench runs (each ratio within its run)" if runs > 1 else "")
        + (f"; **{failed} point(s) failed to time**" if failed else ""),
    ]


def results_csv(df: pd.DataFrame) -> str:
    """results.csv: every field of every point, lists and dicts as JSON in their cell."""
    flat = df[[c for c in df.columns if not str(c).startswith("_")]].copy()  # _cells: the tables' text
    for col in flat.columns:
        if flat[col].map(lambda v: isinstance(v, (list, dict))).any():
            flat[col] = flat[col].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    return flat.to_csv(index=False, lineterminator="\n")


def plot(df: pd.DataFrame, out: Path, cov: Optional[Coverage] = None) -> list[Path]:
    """top-1 vs GMACs and top-1 vs speed (the bench speedup when the sweep has bench figures, else
    model-only images/s): one line per operator from the baseline, each in its fixed colour and
    marker (style.py), top-1 with its 95% interval, the frontier marked; capped points left out,
    flagged speeds drawn hollow; a banner when the sweep is partial. PNG and SVG, rendered without
    pyplot (no display, no global state)."""
    import matplotlib
    from matplotlib.figure import Figure

    b = df[df["op"] == "none"].iloc[0]
    written = []
    speed_col, speed_label = speed_axis(df)
    specs = [("top1_vs_gmacs", "gmacs", "GMACs per image", "frontier"),
             ("top1_vs_speed", speed_col, speed_label, "frontier_speed")]
    with matplotlib.rc_context({"svg.hashsalt": "tpool", "svg.fonttype": "path"}):
        for name, xcol, xlabel, fcol in specs:
            if df[xcol].isna().all():
                continue
            fig = Figure(figsize=(7.0, 4.6), dpi=110)
            ax = fig.add_subplot()
            _draw_operators(ax, df, xcol, hollow_flagged=name == "top1_vs_speed")
            front = df[df[fcol]].sort_values(xcol, kind="stable")
            ax.plot(front[xcol], front["top1"], ls="--", lw=0.8, color="grey", zorder=4)
            ax.plot(front[xcol], front["top1"], ls="none", marker="o", ms=11, mfc="none", mec="black", mew=1.2,
                    label="Pareto frontier", zorder=5)
            ax.plot([b[xcol]], [b["top1"]], marker="*", ms=13, color="black", ls="none", label="baseline", zorder=6)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("top-1 %")
            ax.set_title(f"{b['model']} @ {b['img_size']}px, {int(b['images'])} images ({b['dtype']}, {b['device_name']})", fontsize=9)
            _annotate(fig, df, cov, speed=name == "top1_vs_speed")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8, loc="best")
            fig.tight_layout()
            for suffix in ("png", "svg"):
                path = out / f"{name}.{suffix}"
                fig.savefig(path, format=suffix, metadata={"Date": None} if suffix == "svg" else None)
                written.append(path)
    return written


def speed_axis(df: pd.DataFrame) -> tuple[str, str]:
    """(column, axis label) of the speed plot: the same-run bench speedup when the sweep has bench
    figures (rows of several bench runs stay comparable, as the frontier is), else model-only
    images/s, which under torchrun is the sum of the ranks' figures (they run at the same time)."""
    b = df[df["op"] == "none"].iloc[0]
    if has_bench(df):
        return "speedup", (f"speedup vs. the baseline ({b['bench_img_s']:,.0f} img/s; tpool bench, batch "
                           f"{int(b['bench_batch_size'])}, {b['bench_dtype']}{', compiled' if b['bench_compile'] else ''})")
    return "model_only_img_s", "model-only images/s" + ranks_suffix(df)


def world_sizes(df: pd.DataFrame) -> list[int]:
    """The distinct ``world_size`` of the rows (torchrun ranks; 1 for rows without one), sorted."""
    if "world_size" not in df.columns:
        return [1]
    sizes = pd.to_numeric(df["world_size"], errors="coerce").fillna(1).astype(int)
    return sorted(set(sizes.tolist()))


def ranks_suffix(df: pd.DataFrame) -> str:
    """', sum over N ranks' when every row ran on the same N > 1 torchrun ranks, else ''."""
    sizes = world_sizes(df)
    return f", sum over {sizes[0]} ranks" if len(sizes) == 1 and sizes[0] > 1 else ""


def world_size_note(df: pd.DataFrame) -> Optional[str]:
    """A warning when the rows mix world sizes: their model-only img/s (a sum over ranks) do not compare."""
    sizes = world_sizes(df)
    if len(sizes) < 2:
        return None
    return (f"rows mix world sizes ({', '.join(map(str, sizes))} ranks): model-only img/s is a sum over "
            "each row's ranks, so speeds of different world sizes do not compare")


def _draw_operators(ax, df: pd.DataFrame, xcol: str, hollow_flagged: bool) -> None:
    """One line per operator label from the baseline: fixed colour/marker, 95% interval bars,
    capped points left out, points with a flagged speed hollow (on the speed plot). With fine-tuned
    points, one plot, two styles: off the shelf solid with hollow markers, fine-tuned dashed and filled."""
    variants: dict[str, int] = {}
    base = df[df["op"] == "none"].iloc[:1]
    tuned = bool(finetuned_mask(df).any())
    for op in ops_of(df):
        style = op_style(op)
        ft = is_finetuned_label(op)
        name = op_name(op) + (" ft" if ft else "")
        index = variants[name] = variants.get(name, -1) + 1
        if not tuned:
            ls = variant_linestyle(index)
        else:  # off the shelf solid, fine-tuned dashed; further variants dotted, dash-dotted
            ls = ("--" if ft else "-") if index == 0 else variant_linestyle(index + 1)
        sub = pd.concat([base, df[(df["op"] == op) & ~df["capped"].astype(bool)]]).sort_values(xcol, kind="stable")
        err = [(sub["top1"] - sub["top1_lo"]).clip(lower=0).fillna(0), (sub["top1_hi"] - sub["top1"]).clip(lower=0).fillna(0)]
        ax.errorbar(sub[xcol], sub["top1"], yerr=err, color=style["color"], ls=ls, lw=1.4,
                    elinewidth=0.7, capsize=2, alpha=0.9, label=op if ft or not tuned else f"{op} (off the shelf)")
        flagged = sub["speed_note"].map(lambda v: isinstance(v, str)) if hollow_flagged else sub["op"].map(lambda v: False)
        if tuned:
            flagged = flagged | pd.Series(not ft, index=sub.index)  # off the shelf: hollow markers
        for hollow, part in ((False, sub[~flagged]), (True, sub[flagged])):
            if len(part):
                ax.plot(part[xcol], part["top1"], ls="none", marker=style["marker"], ms=5, mec=style["color"],
                        mfc="none" if hollow else style["color"], mew=1.1, zorder=3)


def op_name_of(label: str) -> str:
    """The registry name of an operator label (variants of one operator share its style)."""
    return re.sub(r"\(.*\)$", "", str(label))


def _annotate(fig, df: pd.DataFrame, cov: Optional[Coverage], speed: bool) -> None:
    """Banner (partial sweep) and footnote (what bars, hollow markers and omissions mean)."""
    if cov is not None and cov.partial:
        fig.text(0.5, 0.995, cov.banner().upper(), ha="center", va="top", fontsize=10, color="#b00020", weight="bold")
    notes = ["bars: 95% interval of top-1"]
    mixed = world_size_note(df)
    if speed and mixed:
        notes.append(mixed)
    if finetuned_mask(df).any():
        notes.append("dashed, filled: fine-tuned with the operator in place (+ft E ep); solid, hollow: off the shelf")
    if speed and df["speed_note"].map(lambda v: isinstance(v, str)).any():
        notes.append("hollow: speed flagged (noisy or busy machine, see pareto.md)")
    if df["capped"].astype(bool).any():
        notes.append(f"{int(df['capped'].astype(bool).sum())} capped point(s) drawn once")
    fig.text(0.01, 0.005, "; ".join(notes), fontsize=6.5, color="#444444", ha="left", va="bottom")


@dataclass
class Report:
    frame: pd.DataFrame
    files: list[Path]
    coverage: Coverage = Coverage()


def write_report(out: Path, rows: Optional[list[dict[str, Any]]] = None, log=None, all_rows: bool = False) -> Report:
    """Write results.csv, pareto.md and the plots into ``out`` from ``rows`` (default: results.jsonl,
    the latest plan's rows, or every row with ``all_rows``)."""
    out = Path(out)
    rows = rows if rows is not None else load_rows(out, log, all_rows=all_rows)
    df = results_frame(rows)
    cov = coverage(out, rows, all_rows=all_rows)
    write_text(out / "results.csv", results_csv(df))
    write_text(out / "pareto.md", pareto_markdown(df, cov))
    files = [out / "results.csv", out / "pareto.md"] + plot(df, out, cov)
    return Report(frame=df, files=files, coverage=cov)


# ---------------------------------------------------------------------------------------------
# CI gates and comparisons


@dataclass(frozen=True)
class Gate:
    """``--fail-below OP@KEEP=TOP1``: the point (OP, KEEP) must reach TOP1 percent."""

    op: str
    keep: float
    top1: float

    def __str__(self) -> str:
        return f"{self.op}@{self.keep:g}={self.top1:g}"


_GATE = re.compile(r"^\s*([^@=\s]+)\s*@\s*([0-9.]+)\s*=\s*([0-9.]+)\s*$")


def parse_gate(text: str) -> Gate:
    match = _GATE.match(text)
    if not match:
        raise TpoolError(f"--fail-below takes OP@KEEP=TOP1 (e.g. topk@0.7=78.5), got {text!r}")
    try:
        return Gate(match.group(1), float(match.group(2)), float(match.group(3)))
    except ValueError:
        raise TpoolError(f"--fail-below takes OP@KEEP=TOP1 with numbers, got {text!r}") from None


def check_gates(df: pd.DataFrame, gates: Sequence[Gate]) -> list[str]:
    """One message per failed gate (a point below its accuracy, or no such point at all)."""
    failures = []
    for gate in gates:
        if gate.op == "none" or gate.keep == 1.0:
            rows = df[df["op"] == "none"]
        else:
            keep = df["keep"].astype(float)
            same_keep = (keep - gate.keep).abs() < 1e-9
            rows = df[same_keep & (df["op"] == gate.op)]
            if rows.empty:
                rows = df[same_keep & (df["op_name"] == gate.op)]
        if rows.empty:
            failures.append(f"{gate}: no point {gate.op} at keep {gate.keep:g} in the results")
            continue
        for _, r in rows.iterrows():
            if r["top1"] < gate.top1:
                failures.append(f"{gate}: {r['op']} {r['schedule']} reached top-1 {r['top1']:.2f} < {gate.top1:g}")
    return failures


def compare(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Two sweeps side by side, matched on (op, schedule): GMACs, top-1 and img/s.

    ``speed_ratio`` is B's img/s over A's: the ``--bench`` figures when both sweeps have them
    (then also in ``bench_img_s_a``/``_b``), else model-only img/s.
    """
    bench = has_bench(a) and has_bench(b)
    cols = ["op", "schedule", "gmacs", "top1", "model_only_img_s"] + (["bench_img_s"] if bench else [])
    merged = pd.merge(a[cols], b[cols], on=["op", "schedule"], how="outer", suffixes=("_a", "_b"), sort=False)
    merged["delta_top1"] = (merged["top1_b"] - merged["top1_a"]).round(4)
    speed = "bench_img_s" if bench else "model_only_img_s"
    merged["speed_ratio"] = (merged[f"{speed}_b"] / merged[f"{speed}_a"]).round(4)
    merged["_g"] = merged["gmacs_a"].fillna(merged["gmacs_b"])
    return merged.sort_values("_g", ascending=False, kind="stable").drop(columns="_g").reset_index(drop=True)


def frontier_rich_table(df: pd.DataFrame, title: str):
    """The frontier as a Rich table (for stdout)."""
    from .output import make_table

    headers, cells = point_table(df[df["frontier"]])
    return make_table(title, headers, cells)
