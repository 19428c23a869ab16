"""Pareto frontier, savings, gates, results store recovery and report files, on hand-made rows."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpool_cli.errors import TpoolError
from tpool_cli.report import (
    Gate, check_gates, compare, frontier_mask, load_rows, parse_gate, results_frame, savings, write_report,
)
from tpool_cli.sweep import ResultsStore


def test_frontier_on_hand_made_points():
    #          0       1        2        3        4          5         6 (= 1)   7 (NaN)
    costs = [1.0, 2.0, 2.0, 3.0, 1.5, 0.5, 2.0, float("nan")]
    values = [50.0, 60.0, 55.0, 60.0, 50.0, 40.0, 60.0, 99.0]
    assert frontier_mask(costs, values) == [True, True, False, False, False, True, True, False]


def test_frontier_edge_cases():
    assert frontier_mask([], []) == []
    assert frontier_mask([1.0], [None]) == [False]
    assert frontier_mask([1.0, 1.0], [5.0, 5.0]) == [True, True]  # identical points do not dominate each other
    assert frontier_mask([1.0, 1.0], [5.0, 4.0]) == [True, False]  # same cost, lower value: dominated
    assert frontier_mask([1.0, 2.0], [5.0, 5.0]) == [True, False]  # same value, higher cost: dominated
    with pytest.raises(ValueError):
        frontier_mask([1.0], [])


def _dominated(i: int, costs, values) -> bool:
    return any(
        costs[j] <= costs[i] and values[j] >= values[i] and (costs[j] < costs[i] or values[j] > values[i])
        for j in range(len(costs))
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=25))
def test_frontier_is_exactly_the_non_dominated_points(points):
    costs = [float(c) for c, _ in points]
    values = [float(v) for _, v in points]
    assert frontier_mask(costs, values) == [not _dominated(i, costs, values) for i in range(len(points))]


def row(op: str, keep: float, gmacs: float, top1: float, ips: float = 100.0, **extra) -> dict:
    """A result row as a sweep writes it (the fields reports read)."""
    base = {
        "key": f"{op}-{keep}", "model": "m", "weights": "w.safetensors", "weights_sha256": "ab" * 32, "random_init": False,
        "op": op, "keep": keep, "schedule": "baseline" if op == "none" else f"keep={keep:g}@3,6,9", "img_size": 224,
        "gmacs": gmacs, "top1": top1, "top5": min(100.0, top1 + 15), "images": 100, "skipped": 0,
        "model_only_img_s": ips, "end_to_end_img_s": ips / 2, "data": "/d", "label_space": "imagenet-1k synsets (timm)",
        "data_fingerprint": "f" * 16, "device": "cpu", "device_name": "cpu", "dtype": "fp32", "batch_size": 64,
        "torch": "2", "timm": "1", "patch_tokens": [196, 137], "op_options": {},
    }
    base.update(extra)
    return base


ROWS = [
    row("none", 1.0, 4.6, 79.8, 1000.0),
    row("topk", 0.9, 3.9, 79.6, 1150.0),
    row("topk", 0.7, 3.1, 78.9, 1400.0),
    row("topk", 0.5, 2.5, 76.0, 1700.0),
    row("grid", 0.9, 3.8, 78.8, 1160.0),
    row("grid", 0.7, 3.0, 77.5, 1420.0),
    row("grid", 0.5, 2.6, 74.0, 1650.0),
]


def test_results_frame_derived_columns_and_frontiers():
    df = results_frame(ROWS).set_index("key")
    assert df.loc["topk-0.7", "delta_top1"] == pytest.approx(-0.9)
    assert df.loc["topk-0.7", "gmacs_saved_pct"] == pytest.approx(100 * (1 - 3.1 / 4.6), abs=1e-3)
    assert df.loc["topk-0.7", "speedup"] == pytest.approx(1.4)
    assert sorted(df.index[df["frontier"]]) == ["grid-0.7", "none-1.0", "topk-0.5", "topk-0.7", "topk-0.9"]
    assert sorted(df.index[df["frontier_op"]]) == ["grid-0.5", "grid-0.7", "grid-0.9", "topk-0.5", "topk-0.7", "topk-0.9"]
    assert "grid-0.5" not in df.index[df["frontier_speed"]]  # slower and worse than topk-0.5


def test_savings_at_bounded_drops():
    sav = savings(results_frame(ROWS)).set_index("op")
    assert sav.loc["topk", "saved_at_0.5"] == pytest.approx(0.7) and sav.loc["topk", "keep_at_0.5"] == "keep=0.9@3,6,9"
    assert sav.loc["topk", "saved_at_1"] == pytest.approx(1.5)
    assert sav.loc["topk", "saved_at_2"] == pytest.approx(1.5)
    assert sav.loc["grid", "saved_at_0.5"] is None or math.isnan(sav.loc["grid", "saved_at_0.5"])
    assert sav.loc["grid", "saved_at_1"] == pytest.approx(0.8)


def test_gates():
    df = results_frame(ROWS)
    assert parse_gate("topk@0.7=78.5") == Gate("topk", 0.7, 78.5)
    assert check_gates(df, [Gate("topk", 0.7, 78.5), Gate("none", 1.0, 79.0)]) == []
    failures = check_gates(df, [Gate("grid", 0.5, 75.0), Gate("evit", 0.7, 1.0)])
    assert len(failures) == 2 and "reached top-1 74.00 < 75" in failures[0] and "no point evit" in failures[1]
    for bad in ("topk0.7=1", "topk@x=1", "topk@0.7", ""):
        with pytest.raises(TpoolError, match="OP@KEEP=TOP1"):
            parse_gate(bad)


def test_gate_matches_operator_labels_with_options():
    rows = ROWS[:1] + [row("topk(score=received)", 0.7, 3.1, 70.0)]
    assert check_gates(results_frame(rows), [Gate("topk", 0.7, 71.0)])[0].startswith("topk@0.7=71: topk(score=received)")


def test_report_files_are_written_and_reproducible(tmp_path):
    rep = write_report(tmp_path, ROWS)
    names = sorted(p.name for p in rep.files)
    assert names == sorted(["results.csv", "pareto.md", "top1_vs_gmacs.png", "top1_vs_gmacs.svg", "top1_vs_speed.png", "top1_vs_speed.svg"])
    first = {p.name: p.read_bytes() for p in rep.files}
    assert all(len(b) > 500 for b in first.values())
    md = first["pareto.md"].decode()
    assert "## Pareto frontier" in md and "### topk" in md and "### grid" in md and "drop ≤ 0.5" in md
    assert "0.7000 GMACs (15.2%) at keep=0.9@3,6,9" in md
    csv_lines = first["results.csv"].decode().splitlines()
    assert len(csv_lines) == 1 + len(ROWS) and "frontier" in csv_lines[0]
    again = write_report(tmp_path, ROWS)
    assert {p.name: p.read_bytes() for p in again.files} == first


def test_compare_matches_points_by_operator_and_schedule():
    other = [dict(r, top1=r["top1"] + 1.0, model_only_img_s=r["model_only_img_s"] * 2) for r in ROWS[:4]]
    cmp = compare(results_frame(ROWS), results_frame(other))
    assert len(cmp) == len(ROWS)
    topk = cmp[(cmp["op"] == "topk") & (cmp["schedule"] == "keep=0.7@3,6,9")].iloc[0]
    assert topk["delta_top1"] == pytest.approx(1.0) and topk["speed_ratio"] == pytest.approx(2.0)
    assert cmp[cmp["op"] == "grid"]["top1_b"].isna().all()


def test_store_recovers_a_truncated_last_line(tmp_path):
    logged = []
    store = ResultsStore(tmp_path / "results.jsonl", logged.append)
    for r in ROWS[:3]:
        store.append(r)
    with open(store.path, "ab") as fh:
        fh.write(json.dumps(ROWS[3]).encode()[:40])  # killed while writing
    rows = store.read()
    assert [r["key"] for r in rows] == [r["key"] for r in ROWS[:3]]
    assert "truncated last line" in logged[0]
    assert store.path.read_bytes().endswith(b"\n")
    store.append(ROWS[3])
    assert [r["key"] for r in store.read()] == [r["key"] for r in ROWS[:4]] and len(logged) == 1


def test_store_drops_bad_lines_and_duplicates(tmp_path):
    logged = []
    store = ResultsStore(tmp_path / "results.jsonl", logged.append)
    store.append(ROWS[0])
    with open(store.path, "ab") as fh:
        fh.write(b"{not json\n")
    store.append(ROWS[1])
    store.append(ROWS[1])
    with open(store.path, "ab") as fh:
        fh.write(b"[1, 2]\n")  # complete (newline-terminated) but not an object: ignored, never cut
        fh.write(b'{"half": ')  # truncated: a write cut before its newline
    before = store.path.read_bytes()
    rows = store.read(repair=False)
    assert store.path.read_bytes() == before  # reading for a report never writes
    assert [r["key"] for r in rows] == [ROWS[0]["key"], ROWS[1]["key"]]
    assert any("line 2 is not a JSON object" in m for m in logged) and any("line 5 is not a JSON object" in m for m in logged)
    assert any("repeats point" in m for m in logged) and any("truncated last line" in m for m in logged)
    assert store.read() == rows
    assert store.path.read_bytes() == before[: before.rindex(b"\n") + 1]  # only the truncated tail is cut
    assert ResultsStore(tmp_path / "missing.jsonl").read() == []


def test_report_rebuilds_the_latest_sweep_only(tmp_path):
    """Two sweeps into one folder: the report is of the latest plan, not of everything comparable."""
    store = ResultsStore(tmp_path / "results.jsonl")
    for r in ROWS:
        store.append(r)
    latest = [ROWS[0]["key"], ROWS[4]["key"], ROWS[5]["key"]]  # baseline + grid, as a second `--ops grid` run
    (tmp_path / "plan.json").write_text(json.dumps({"keys": latest}))
    assert [r["key"] for r in load_rows(tmp_path)] == latest
    (tmp_path / "plan.json").unlink()  # no plan (older folders): every row of the latest configuration
    assert len(load_rows(tmp_path)) == len(ROWS)


def test_foreign_rows_are_one_clear_error():
    with pytest.raises(TpoolError, match="lack top1"):
        results_frame([{k: v for k, v in r.items() if k != "top1"} for r in ROWS])


def test_bench_figures_replace_the_model_only_speed(tmp_path):
    """With `pareto --bench` figures, speedup and the speed frontier are the same-run bench ratios."""
    from tpool_cli.report import has_bench, point_table

    ratios = {"none-1.0": 1.0, "topk-0.9": 1.1, "topk-0.7": 1.3, "topk-0.5": 1.2, "grid-0.9": 1.05, "grid-0.7": 1.25, "grid-0.5": 1.6}
    bench = [
        dict(r, bench_img_s=500.0 * ratios[r["key"]], bench_vs_baseline=ratios[r["key"]], bench_vs_ideal=0.9, bench_run="1",
             bench_batch_size=8, bench_dtype="bf16", bench_compile=False, bench_steps=5, bench_repeats=3, bench_error=None)
        for r in ROWS
    ]
    assert not has_bench(results_frame(ROWS)) and has_bench(results_frame(bench))
    df = results_frame(bench).set_index("key")
    assert df.loc["topk-0.7", "speedup"] == 1.3  # not model-only 1400/1000
    assert df.loc["grid-0.5", "frontier_speed"] and not df.loc["topk-0.5", "frontier_speed"]  # slower than topk-0.7, worse
    headers, cells = point_table(results_frame(bench))
    assert headers[-5:] == ["bench img/s", "spread", "speedup", "of ideal", "notes"] and headers.count("speedup") == 1
    md = write_report(tmp_path, bench)
    text = (tmp_path / "pareto.md").read_text()
    assert "- bench: 500 img/s baseline; batch 8, bf16, eager, median of 3 runs of 5 calls" in text
    assert "figures from" not in text and "failed to time" not in text
    assert md.frame["speedup"].tolist() == results_frame(bench)["speedup"].tolist()
    mixed = [dict(r, bench_run=str(i % 2)) for i, r in enumerate(bench)]
    mixed[2]["bench_error"] = "RuntimeError: boom"
    write_report(tmp_path, mixed)
    text = (tmp_path / "pareto.md").read_text()
    assert "figures from 2 bench runs (each ratio within its run)" in text and "**1 point(s) failed to time**" in text


def test_speed_label_under_torchrun_and_mixed_world_sizes(tmp_path, capsys):
    """Model-only img/s of a torchrun sweep is the sum over its ranks: the plot's label says so; rows of
    several world sizes get a warning in pareto.md, the plot's footnote and `tpool report`'s stderr."""
    from tpool_cli.report import speed_axis, world_size_note

    assert speed_axis(results_frame(ROWS)) == ("model_only_img_s", "model-only images/s")  # no world_size: 1
    three = [dict(r, world_size=3) for r in ROWS]
    assert speed_axis(results_frame(three)) == ("model_only_img_s", "model-only images/s, sum over 3 ranks")
    assert world_size_note(results_frame(three)) is None
    write_report(tmp_path, three)
    text = (tmp_path / "pareto.md").read_text()
    assert "1,000 img/s model-only, sum over 3 ranks" in text and "warning" not in text
    mixed = [dict(r, world_size=1 if i < 3 else 2) for i, r in enumerate(ROWS)]
    df = results_frame(mixed)
    assert speed_axis(df)[1] == "model-only images/s" and "mix world sizes (1, 2 ranks)" in world_size_note(df)
    write_report(tmp_path, mixed)
    assert "- **warning**: rows mix world sizes (1, 2 ranks)" in (tmp_path / "pareto.md").read_text()
    with open(tmp_path / "results.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in mixed)
    from tpool_cli.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == 0 and "rows mix world sizes" in capsys.readouterr().err


def test_compare_uses_bench_figures_when_both_sweeps_have_them():
    def benched(rows, scale):
        return [dict(r, bench_img_s=scale * r["model_only_img_s"] / 2, bench_vs_baseline=1.0, bench_vs_ideal=1.0) for r in rows]

    both = compare(results_frame(benched(ROWS, 1.0)), results_frame(benched(ROWS, 3.0)))
    assert both["speed_ratio"].tolist() == [3.0] * len(ROWS) and "bench_img_s_a" in both.columns
    one = compare(results_frame(benched(ROWS, 1.0)), results_frame(ROWS))  # only A has them: model-only for both
    assert one["speed_ratio"].tolist() == [1.0] * len(ROWS) and "bench_img_s_a" not in one.columns


# ---------------------------------------------------------------------------------------------
# Issue 16: intervals, paired tests, capped points, speed flags, stable styles, partial, --all


def test_old_rows_render_unpaired_with_intervals(tmp_path):
    """Rows written before per-image records existed: intervals from their counts, tests marked unpaired."""
    df = results_frame(ROWS)
    top = df[df["key"] == "topk-0.5"].iloc[0]
    assert (top["top1_lo"], top["top1_hi"]) == (66.77, 83.31)  # Wilson of 76/100 (scipy binomtest agrees)
    assert top["paired"] is False and top["_p_base"].endswith(" (u)") and "unpaired" in top["_notes"]
    write_report(tmp_path, ROWS)
    text = (tmp_path / "pareto.md").read_text()
    assert "| topk | keep=0.5@3,6,9 | 2.5000 | 45.7 | 100 | 76.00 | [66.77, 83.31] | -3.80 | — |" in text
    assert "_notes" not in (tmp_path / "results.csv").read_text().splitlines()[0]  # table text stays out of the CSV


def test_paired_rows_carry_flips_and_the_exact_p_value():
    from tpool_cli.stats import encode_bits

    n = 100
    base_bits = [i < 80 for i in range(n)]  # 80 right
    op_bits = [(i < 80 and i >= 10) or 90 <= i < 93 for i in range(n)]  # loses 10, gains 3: 73 right
    rows = [dict(ROWS[0], top1=80.0, correct1=80, correct1_bits=encode_bits(base_bits)),
            dict(ROWS[1], top1=73.0, correct1=73, correct1_bits=encode_bits(op_bits))]
    r = results_frame(rows).set_index("key").loc["topk-0.9"]
    assert (r["gain"], r["loss"], r["paired"]) == (3, 10, True)
    assert r["p_base"] == round(2 * 378 / 8192, 6) and r["_p_base"] == "0.092" and r["_flips"] == "+3/−10"


def test_points_beyond_a_cap_are_marked_once_and_off_the_frontier():
    rows = [ROWS[0], row("tome", 0.5, 2.4, 77.0, patch_tokens=[196, 98]), row("tome", 0.3, 2.4, 77.0, patch_tokens=[196, 98]),
            row("tome", 0.7, 3.2, 78.0, patch_tokens=[196, 137])]
    df = results_frame(rows).set_index("key")
    assert df.loc["tome-0.3", "capped"] and df.loc["tome-0.3", "capped_as"] == "keep=0.5@3,6,9"
    assert not df.loc["tome-0.5", "capped"] and not df.loc["tome-0.7", "capped"]
    assert df.loc["tome-0.5", "frontier"] and not df.loc["tome-0.3", "frontier"]
    assert "capped (= keep=0.5@3,6,9)" in df.loc["tome-0.3", "_notes"]


def test_flagged_speeds_are_noted_and_bench_flags_follow_their_runs():
    rows = [dict(ROWS[0], speed_flag="busy: load 3.10 on 2 cores", model_only_spread=0.05), ROWS[1]]
    df = results_frame(rows)
    assert df.loc[0, "_notes"] == "speed busy: load 3.10 on 2 cores" and df.loc[0, "_spread"] == "5%"
    assert not isinstance(df.loc[1, "speed_note"], str) and df.loc[1, "_notes"] == "unpaired"
    bench = [dict(r, bench_img_s=500.0, bench_vs_baseline=1.0, bench_vs_ideal=1.0, bench_batch_size=8, bench_dtype="fp32",
                  bench_compile=False, bench_steps=5, bench_repeats=3, bench_runs_img_s=runs)
             for r, runs in ((ROWS[0], [500.0, 505.0, 498.0]), (ROWS[1], [300.0, 500.0, 510.0]))]  # old bench rows: no flag stored
    df = results_frame(bench)
    assert not isinstance(df.loc[0, "speed_note"], str) and df.loc[1, "speed_note"] == "noisy: spread 42%"


def test_operator_colours_are_fixed_across_sweeps_with_other_operator_sets():
    from matplotlib.figure import Figure

    from tpool_cli.ops import operator_names
    from tpool_cli.report import _draw_operators
    from tpool_cli.style import OPERATOR_ORDER, op_style

    assert list(OPERATOR_ORDER) == [n for n in operator_names() if n != "none"]
    assert len({op_style(n)["color"] for n in OPERATOR_ORDER}) == len(OPERATOR_ORDER)  # no two operators share a colour

    def colours(rows):
        ax = Figure().add_subplot()
        _draw_operators(ax, results_frame(rows), "gmacs", hollow_flagged=False)
        return {c.get_label(): c.lines[0].get_color() for c in ax.containers}

    a = colours([ROWS[0], row("kmeans", 0.5, 2.5, 76.0), row("tome", 0.5, 2.4, 77.0)])
    b = colours([ROWS[0], row("grid", 0.5, 2.5, 75.0), row("topk", 0.5, 2.5, 74.0), row("kmeans", 0.5, 2.5, 76.0)])
    assert a["kmeans"] == b["kmeans"] == op_style("kmeans")["color"] and a["tome"] != a["kmeans"]
    assert op_style("kmeans(iters=3)") == op_style("kmeans") and op_style("new_op") == op_style("new_op")


def test_report_all_renders_every_row_and_the_default_counts_what_it_leaves_out(tmp_path):
    store = ResultsStore(tmp_path / "results.jsonl")
    for r in ROWS:
        store.append(r)
    latest = [ROWS[0]["key"], ROWS[4]["key"]]  # a later `--ops grid --keep 0.9` into the same folder
    (tmp_path / "plan.json").write_text(json.dumps({"keys": latest}))
    logged: list[str] = []
    assert len(load_rows(tmp_path, logged.append)) == 2
    assert any("leaving out 5" in m and "--all" in m for m in logged)
    write_report(tmp_path)
    assert "results.jsonl holds 5 more row(s) of other plans" in (tmp_path / "pareto.md").read_text()
    rep = write_report(tmp_path, all_rows=True)
    assert len(rep.frame) == len(ROWS) and not rep.coverage.partial
    assert "every row of results.jsonl (`tpool report --all`)" in (tmp_path / "pareto.md").read_text()


def test_an_interrupted_sweep_reports_partial(tmp_path):
    from imagefolders import CKPT_MODEL, random_checkpoint, small_label_space
    from tpool_cli.models import load_model
    from tpool_cli.sweep import SweepProgress, plan_points, run_sweep

    class StopAtThird(SweepProgress):
        def __init__(self):
            self.points = 0

        def point(self, label, total_images):
            self.points += 1
            if self.points == 3:
                def stop(n):
                    raise KeyboardInterrupt
                return stop
            return lambda n: None

    data, class_map = small_label_space(tmp_path / "data")
    loaded = load_model(CKPT_MODEL, weights=random_checkpoint(tmp_path / "w.safetensors", img_size=32, classes=10), img_size=32)
    points = plan_points(["topk", "grid"], [0.7, 0.5])
    result = run_sweep(loaded, data, points, tmp_path / "out", class_map=class_map, limit=4, batch_size=4, workers=0,
                       progress=StopAtThird(), log=lambda m: None)
    assert result.interrupted and len(result.rows) == 2 and result.planned == 5
    assert all(isinstance(r["correct1_bits"], str) for r in result.rows)
    rep = write_report(tmp_path / "out", result.rows)
    assert rep.coverage.banner() == "partial: 2 of 5 points"
    assert "> **partial: 2 of 5 points**" in (tmp_path / "out" / "pareto.md").read_text()
    assert b"PARTIAL: 2 OF 5 POINTS" in (tmp_path / "out" / "top1_vs_gmacs.svg").read_bytes()  # the banner on the plot
    write_report(tmp_path / "out")  # `tpool report` later: the same banner from plan.json
    assert "> **partial: 2 of 5 points**" in (tmp_path / "out" / "pareto.md").read_text()
