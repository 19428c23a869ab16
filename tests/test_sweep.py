"""`tpool pareto` / `tpool report` for real: a sweep killed with SIGKILL resumes to the same results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from imagefolders import CKPT_MODEL, random_checkpoint, small_label_space
from tpool_cli.cli import main
from tpool_cli.data import scan_folder
from tpool_cli.evaluate import evaluate
from tpool_cli.models import load_model
from tpool_cli.sweep import ResultsStore, plan_points, run_sweep

OPS, KEEPS, LIMIT = "topk,grid,random", "0.9,0.7,0.5", 12
N_POINTS = 1 + 3 * 3
SAME = ("key", "op", "schedule", "top1", "top5", "correct1", "correct5", "images", "skipped", "gmacs", "patch_tokens", "weights_sha256", "data_fingerprint")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    data, class_map = small_label_space(root)
    return {"data": data, "class_map": class_map, "ckpt": random_checkpoint(root / "random64.safetensors", img_size=64, classes=10)}


def pareto_args(setup, out) -> list[str]:
    return [
        "pareto", "--model", CKPT_MODEL, "--img-size", "64", "--weights", str(setup["ckpt"]), "--data", str(setup["data"]),
        "--class-map", str(setup["class_map"]), "--ops", OPS, "--keep", KEEPS, "--limit", str(LIMIT), "-j", "0", "-b", "4", "--out", str(out),
    ]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200", **extra}


def reference_sweep(setup, out, **kwargs):
    loaded = load_model(CKPT_MODEL, weights=setup["ckpt"], img_size=64)
    points = plan_points(OPS.split(","), [float(k) for k in KEEPS.split(",")])
    logged: list[str] = []
    result = run_sweep(loaded, setup["data"], points, out, class_map=setup["class_map"], limit=LIMIT, batch_size=4, workers=0, log=logged.append, **kwargs)
    return loaded, points, result, logged


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_plan_has_the_baseline_first_and_no_identity_points():
    points = plan_points(["topk", "grid", "topk"], [1.0, 0.7, 0.7])
    assert points[0].is_baseline
    assert [(p.operator.name, p.schedule.keep) for p in points[1:]] == [("topk", 0.7), ("grid", 0.7)]


def test_sigkill_mid_sweep_then_resume_equals_an_uninterrupted_run(setup, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tpool_cli", *pareto_args(setup, out)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the sweep ended before it could be killed"
    done_before = ResultsStore(results, lambda m: None).read()
    assert 2 <= len(done_before) < N_POINTS

    summary = tmp_path / "summary.md"
    rerun = subprocess.run([sys.executable, "-m", "tpool_cli", *pareto_args(setup, out)], env=env(GITHUB_STEP_SUMMARY=str(summary)),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"reused {len(done_before)} point(s)" in rerun.stderr
    assert "Pareto frontier" in rerun.stdout
    rows = lines(results)
    assert len(rows) == N_POINTS and len({r["key"] for r in rows}) == N_POINTS
    assert "# Pareto sweep" in summary.read_text()

    # the same sweep uninterrupted, in this process, with the images cached on disk instead of in memory
    _, _, reference, _ = reference_sweep(setup, tmp_path / "reference", cache="disk")
    assert reference.evaluated == N_POINTS and reference.cache_storage.startswith("mmap:")
    by_key = {r["key"]: r for r in rows}
    for ref in reference.rows:
        assert {k: by_key[ref["key"]][k] for k in SAME} == {k: ref[k] for k in SAME}

    # tpool report rebuilds the very same files from results.jsonl
    produced = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name not in ("results.jsonl", "plan.json", ".tpool.lock")}
    assert set(produced) >= {"results.csv", "pareto.md", "top1_vs_gmacs.png", "top1_vs_gmacs.svg", "top1_vs_speed.png", "top1_vs_speed.svg"}
    for name in produced:
        (out / name).unlink()
    with pytest.raises(SystemExit) as info:
        main(["report", str(out)])
    assert info.value.code == 0
    assert {name: (out / name).read_bytes() for name in produced} == produced

    # two result folders side by side
    with pytest.raises(SystemExit) as info:
        main(["report", str(out), str(tmp_path / "reference"), "-f", "json"])
    assert info.value.code == 0


def test_corrupted_last_line_is_recovered_and_only_that_point_rerun(setup, tmp_path):
    out = tmp_path / "out"
    _, points, first, _ = reference_sweep(setup, out)
    assert first.evaluated == N_POINTS
    path = out / "results.jsonl"
    data = path.read_bytes()
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[1]
    path.write_bytes(data[: len(data) - len(last) - 1] + last[: len(last) // 2])  # killed while writing the last point
    _, _, again, logged = reference_sweep(setup, out)
    assert again.evaluated == 1 and again.reused == N_POINTS - 1
    assert any("truncated last line" in m for m in logged)
    rows = lines(path)
    assert len(rows) == N_POINTS and len({r["key"] for r in rows}) == N_POINTS
    assert {r["key"]: r["top1"] for r in rows} == {r["key"]: r["top1"] for r in first.rows}


def test_other_configurations_are_never_reused(setup, tmp_path):
    out = tmp_path / "out"
    loaded = load_model(CKPT_MODEL, weights=setup["ckpt"], img_size=64)
    points = plan_points(["random"], [0.5])
    common = dict(workers=0, class_map=setup["class_map"])
    a = run_sweep(loaded, setup["data"], points, out, limit=4, batch_size=4, **common)
    b = run_sweep(loaded, setup["data"], points, out, limit=5, batch_size=4, **common)  # other data: other fingerprint
    c = run_sweep(loaded, setup["data"], points, out, limit=4, batch_size=4, seed=1, **common)  # other seed of `random`
    assert (a.evaluated, b.evaluated) == (2, 2)
    assert (c.evaluated, c.reused) == (1, 1)  # the baseline does not depend on the operator's seed
    assert len(lines(out / "results.jsonl")) == 5
    d = run_sweep(loaded, setup["data"], points, out, limit=5, batch_size=4, **common)
    assert (d.evaluated, d.reused) == (0, 2)
    f = run_sweep(loaded, setup["data"], points, out, limit=5, batch_size=2, **common)  # other batch: other timings
    assert (f.evaluated, f.reused) == (2, 0)
    g = run_sweep(loaded, setup["data"], plan_points(["topk"], [0.5]), out, limit=4, batch_size=4, seed=3, **common)
    h = run_sweep(loaded, setup["data"], plan_points(["topk"], [0.5]), out, limit=4, batch_size=4, seed=4, **common)
    assert (g.evaluated, h.evaluated, h.reused) == (1, 0, 2)  # a deterministic operator ignores the seed
    e = run_sweep(loaded, setup["data"], points, out, limit=5, batch_size=4, resume=False, **common)
    assert (e.evaluated, e.reused) == (2, 0)
    assert len(lines(out / "results.jsonl.old")) == 8 and len(lines(out / "results.jsonl")) == 2
    run_sweep(loaded, setup["data"], points, out, limit=5, batch_size=4, resume=False, **common)
    assert len(lines(out / "results.jsonl.old")) == 8 and len(lines(out / "results.jsonl.old.2")) == 2  # never overwritten


def test_cached_sweep_top1_equals_uncached_evaluation_for_every_point(setup, tmp_path):
    loaded, points, result, _ = reference_sweep(setup, tmp_path / "out")
    folder = scan_folder(setup["data"], class_map=setup["class_map"], limit=LIMIT)
    by_point = {r["point"]: r for r in result.rows}
    assert len(by_point) == N_POINTS
    for point in points:
        point.apply(loaded.model)
        uncached = evaluate(loaded, folder, batch_size=4, workers=0, count=False)
        row = by_point[point.label(len(loaded.model.blocks))]
        assert (uncached.correct1, uncached.correct5, uncached.images) == (row["correct1"], row["correct5"], row["images"]), point.label(12)
        assert round(uncached.top5, 4) == row["top5"]
    assert len({(r["top1"], r["top5"]) for r in result.rows}) > 1  # the operators change the predictions


def test_fail_below_exit_codes(setup, tmp_path, capsys):
    out = tmp_path / "out"
    reference_sweep(setup, out)
    top1 = {r["op"] + "@" + str(r["keep"]): r["top1"] for r in lines(out / "results.jsonl")}

    def report(*gates: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as info:
            main(["report", str(out), *[a for g in gates for a in ("--fail-below", g)]])
        return info.value.code, capsys.readouterr().err

    assert report(f"topk@0.7={top1['topk@0.7']}", f"none@1={top1['none@1.0']}")[0] == 0
    code, err = report(f"topk@0.7={top1['topk@0.7'] + 0.01}")
    assert code == 1 and "fail-below" in err
    code, err = report("evit@0.7=1")
    assert code == 1 and "no point evit" in err
    code, err = report("topk=0.7")
    assert code == 2 and "OP@KEEP=TOP1" in err


def test_pareto_errors_are_one_line(setup, tmp_path, capsys):
    for extra, message in [
        (["--keep", "0.7", "--tokens", "40,20,10"], "not both"),
        (["--cache", "gpu"], "--cache must be"),
        (["--fail-below", "bad"], "OP@KEEP=TOP1"),
        (["--ops", "nope"], "unknown operator"),
    ]:
        with pytest.raises(SystemExit) as info:
            main([*pareto_args(setup, tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and "Traceback" not in err
    with pytest.raises(SystemExit) as info:
        main(["report", str(tmp_path / "nothing")])
    assert info.value.code == 2 and "no results.jsonl" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as info:
        main([*pareto_args(setup, tmp_path / "a_file" / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "cannot create the output folder" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as info:  # error texts are printed as they are, not read as Rich markup
        main(["pareto", "--data", str(tmp_path / "[x]missing"), "--out", str(tmp_path / "o2")])
    assert info.value.code == 2 and "[x]missing" in capsys.readouterr().err


def test_bench_figures_join_the_sweep_and_are_reused(setup, tmp_path):
    """pareto --bench: every point timed once (baseline and ideal in the same run), kept in bench.jsonl,
    merged into the rows and the report; a rerun times nothing, a new point only itself."""
    from tpool_cli.bench import BenchSettings
    from tpool_cli.report import load_rows, results_frame

    out = tmp_path / "out"
    quick = BenchSettings(batch_size=2, warmup=0, steps=1, repeats=1)
    loaded = load_model(CKPT_MODEL, weights=setup["ckpt"], img_size=64)
    common = dict(class_map=setup["class_map"], limit=4, batch_size=4, workers=0, bench=quick)
    points = plan_points(["topk", "grid"], [0.5])
    first = run_sweep(loaded, setup["data"], points, out, **common)
    assert (first.evaluated, first.benched) == (3, 3)
    bench_rows = lines(out / "bench.jsonl")
    assert len(bench_rows) == 3 and len({r["bench_run"] for r in bench_rows}) == 1
    by_op = {r["op"]: r for r in first.rows}
    base = by_op["none"]
    assert base["bench_vs_baseline"] == 1.0 and base["bench_img_s"] == base["bench_baseline_img_s"] > 0
    for op in ("topk", "grid"):
        r = by_op[op]
        assert r["bench_error"] is None and r["bench_img_s"] > 0 and r["bench_baseline_img_s"] == base["bench_img_s"]
        assert r["bench_vs_baseline"] == pytest.approx(r["bench_img_s"] / r["bench_baseline_img_s"], rel=1e-3)
        assert r["bench_vs_ideal"] == pytest.approx(r["bench_img_s"] / r["bench_ideal_img_s"], rel=1e-3)
        assert (r["bench_batch_size"], r["bench_steps"], r["bench_dtype"], r["bench_compile"]) == (2, 1, "fp32", False)
    assert load_rows(out) == first.rows  # tpool report sees the same figures
    df = results_frame(first.rows)
    assert df.set_index("op").loc["topk", "speedup"] == by_op["topk"]["bench_vs_baseline"]

    again = run_sweep(loaded, setup["data"], points, out, **common)
    assert (again.evaluated, again.benched) == (0, 0) and again.rows == first.rows
    more = run_sweep(loaded, setup["data"], plan_points(["topk", "grid", "random"], [0.5]), out, **common)
    assert (more.evaluated, more.benched) == (1, 1)  # only the new point; its ratios are against its own run's baseline
    assert len(lines(out / "bench.jsonl")) == 4
    new = next(r for r in more.rows if r["op"] == "random")
    assert new["bench_run"] and new["bench_vs_baseline"] == pytest.approx(new["bench_img_s"] / new["bench_baseline_img_s"], rel=1e-3)
    slower = run_sweep(loaded, setup["data"], points, out, **{**common, "bench": BenchSettings(batch_size=2, warmup=0, steps=2, repeats=1)})
    assert (slower.evaluated, slower.benched) == (0, 3)  # other timing settings: other figures
    other_data = run_sweep(loaded, setup["data"], points, out, **{**common, "limit": 5})
    assert (other_data.evaluated, other_data.benched) == (3, 0)  # a synthetic-batch timing does not depend on the data
    plain = run_sweep(loaded, setup["data"], points, out, **{**common, "bench": None})
    assert plain.benched == 0 and "bench_img_s" not in plain.rows[0] and "bench_img_s" not in load_rows(out)[0]
    fresh = run_sweep(loaded, setup["data"], points, out, resume=False, **common)
    assert (fresh.evaluated, fresh.benched) == (3, 3)  # --no-resume starts the bench figures over too
    assert len(lines(out / "bench.jsonl.old")) == 7 and len(lines(out / "bench.jsonl")) == 3


def test_failed_bench_rows_are_timed_again_and_a_failed_baseline_is_reported(setup, tmp_path, monkeypatch):
    import tpool_cli.sweep_bench as sweep_bench
    from tpool_cli.bench import BenchSettings
    from tpool_cli.errors import TpoolError
    from tpool_cli.report import load_rows, write_report

    out = tmp_path / "out"
    loaded = load_model(CKPT_MODEL, weights=setup["ckpt"], img_size=64)
    common = dict(class_map=setup["class_map"], limit=4, batch_size=4, workers=0, bench=BenchSettings(batch_size=2, warmup=0, steps=1, repeats=1))
    points = plan_points(["topk", "grid"], [0.5])
    first = run_sweep(loaded, setup["data"], points, out, **common)
    topk = next(r for r in lines(out / "bench.jsonl") if r["op"] == "topk")
    with open(out / "bench.jsonl", "a") as fh:  # a transient failure recorded by a later run
        fh.write(json.dumps(dict(topk, bench_img_s=None, bench_vs_baseline=None, bench_error="RuntimeError: out of memory")) + "\n")
    assert next(r for r in load_rows(out) if r["op"] == "topk")["bench_error"] == "RuntimeError: out of memory"
    again = run_sweep(loaded, setup["data"], points, out, **common)
    assert again.benched == 1  # only the failed point; the newest row wins
    retimed = next(r for r in again.rows if r["op"] == "topk")
    assert retimed["bench_error"] is None and retimed["bench_img_s"] > 0 and retimed["bench_run"] is not None
    assert again.rows == load_rows(out) and len(first.rows) == len(again.rows)

    def no_baseline(*args, **kwargs):
        raise TpoolError("the unpatched model does not run: RuntimeError: out of memory")

    monkeypatch.setattr(sweep_bench, "bench", no_baseline)
    busy = run_sweep(loaded, setup["data"], plan_points(["topk", "grid", "random"], [0.5]), out, **common)
    assert busy.bench_failed and busy.benched == 0  # the new point could not be timed this time...
    base = next(r for r in busy.rows if r["op"] == "none")
    assert base["bench_error"] is None and base["bench_img_s"] > 0  # ...and the baseline's good row still counts
    assert next(r for r in busy.rows if r["op"] == "random").get("bench_img_s") is None
    other = run_sweep(loaded, setup["data"], points, out, **{**common, "bench": BenchSettings(batch_size=4096, warmup=0, steps=1, repeats=1)})
    assert other.bench_failed and "try a smaller one" in other.bench_failed and "out of memory" in other.bench_failed
    assert len(other.rows) == 3 and other.rows == load_rows(out)  # the accuracy points are all there
    write_report(out, other.rows)
    assert "**the baseline could not be timed** (the unpatched model does not run" in (out / "pareto.md").read_text()


def test_pareto_bench_cli(setup, tmp_path, capsys):
    out = tmp_path / "o"
    args = [*pareto_args(setup, out), "--ops", "topk", "--keep", "0.5", "--limit", "4", "--bench", "--bench-steps", "1",
            "--bench-repeats", "1", "--bench-batch-size", "2"]
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 0, err
    assert "timed 2 point(s) with tpool bench" in err
    md = (out / "pareto.md").read_text()
    assert "- bench: " in md and "batch 2, fp32, eager, median of 1 runs of 1 calls" in md and "| of ideal |" in md
    assert "bench_vs_ideal" in (out / "results.csv").read_text().splitlines()[0]
    produced = {name: (out / name).read_bytes() for name in ("pareto.md", "results.csv", "top1_vs_speed.svg")}
    with pytest.raises(SystemExit) as info:
        main(["report", str(out)])
    assert info.value.code == 0 and {name: (out / name).read_bytes() for name in produced} == produced
    with pytest.raises(SystemExit) as info:
        main([*pareto_args(setup, out), "--bench-steps", "3"])
    assert info.value.code == 2 and "--bench-steps goes with --bench" in capsys.readouterr().err
    plain = tmp_path / "plain"
    with pytest.raises(SystemExit) as info:
        main([*pareto_args(setup, plain), "--ops", "topk", "--keep", "0.5", "--limit", "4"])
    assert info.value.code == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["report", str(out), str(plain), "-f", "json"])
    assert info.value.code == 0 and "only o has --bench figures: comparing model-only img/s" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([*pareto_args(setup, out), "--bench-repeats", "3", "--bench-batch-size", "2"])
    assert info.value.code == 2 and "--bench-batch-size, --bench-repeats go with --bench" in capsys.readouterr().err


def test_pareto_retime_times_every_planned_point_again(tmp_path, capsys):
    """`--retime` (issue 16): a second demo sweep times every planned point again, those already timed
    included; bench.jsonl gains a row per point and the report shows the newest ones."""
    from tpool_cli.report import load_rows

    out = tmp_path / "demo"
    args = ["pareto", "--ops", "topk", "--keep", "0.5", "--limit", "8", "--out", str(out), "-j", "0",
            "--bench-steps", "1", "--bench-repeats", "1", "--bench-batch-size", "2"]
    for extra in (["--bench"], ["--bench"], ["--retime"]):
        with pytest.raises(SystemExit) as info:
            main([*args, *extra])
        assert info.value.code == 0, capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    planned = [plan["bench"][k] for k in plan["keys"]]  # bench keys of the planned points, baseline first
    bench_rows = lines(out / "bench.jsonl")
    assert len(planned) == 2 and len(bench_rows) == 4  # the plain rerun timed nothing, --retime both points again
    assert sorted(r["key"] for r in bench_rows[:2]) == sorted(r["key"] for r in bench_rows[2:]) == sorted(planned)
    newest = {r["key"]: r["bench_img_s"] for r in bench_rows[2:]}
    shown = {plan["bench"][r["key"]]: r["bench_img_s"] for r in load_rows(out)}
    assert shown == newest and shown != {r["key"]: r["bench_img_s"] for r in bench_rows[:2]}
    assert f"{newest[planned[0]]:,.0f} img/s baseline" in (out / "pareto.md").read_text()


def test_interrupted_bench_pass_keeps_every_accuracy_point(setup, tmp_path):
    from tpool_cli.bench import BenchSettings
    from tpool_cli.report import load_rows
    from tpool_cli.sweep import SweepProgress

    class CtrlC(SweepProgress):
        def bench(self, message: str) -> None:
            if "timed round" in message:
                raise KeyboardInterrupt

    out = tmp_path / "out"
    loaded = load_model(CKPT_MODEL, weights=setup["ckpt"], img_size=64)
    common = dict(class_map=setup["class_map"], limit=4, batch_size=4, workers=0, bench=BenchSettings(batch_size=2, warmup=0, steps=1, repeats=1))
    points = plan_points(["grid"], [0.5])
    cut = run_sweep(loaded, setup["data"], points, out, progress=CtrlC(), **common)
    assert cut.interrupted and cut.bench_interrupted and cut.evaluated == 2 and len(cut.rows) == 2
    assert not (out / "bench.jsonl").exists()  # eager rows are final only after the last round
    resumed = run_sweep(loaded, setup["data"], points, out, **common)
    assert (resumed.evaluated, resumed.reused, resumed.benched) == (0, 2, 2) and not resumed.interrupted

    class CtrlCInAccuracy(SweepProgress):
        def point(self, label: str, total_images: int):
            raise KeyboardInterrupt

    more = run_sweep(loaded, setup["data"], plan_points(["grid", "topk"], [0.5]), out, progress=CtrlCInAccuracy(), **common)
    assert more.interrupted and not more.bench_interrupted and more.benched == 0
    assert [r["op"] for r in more.rows] == ["none", "grid"] and all(r["bench_img_s"] for r in more.rows)
    assert more.rows == load_rows(out)  # pareto's report and `tpool report` see the same figures


def test_compiled_bench_rows_are_written_as_each_variant_finishes(tmp_path):
    """Compiling on a GPU takes minutes per variant: a Ctrl-C must not cost the variants already timed."""
    from conftest import tiny_vit
    from tpool_cli.bench import BenchSettings
    from tpool_cli.sweep_bench import bench_points

    model = tiny_vit()
    points = plan_points(["topk", "grid"], [0.5], layers=(1, 2))
    planned = [(p, f"point-{i}") for i, p in enumerate(points)]
    keys = {k: f"bench-{k}" for _, k in planned}
    settings = BenchSettings(batch_size=2, warmup=0, steps=1, repeats=1, compile=True, compile_backend="aot_eager")

    def stop_at_grid(message: str) -> None:
        if message.startswith("compiling and timing grid"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bench_points(model, planned, keys, settings, torch.device("cpu"), tmp_path, progress=stop_at_grid, log=lambda m: None)
    rows = lines(tmp_path / "bench.jsonl")
    assert [r["op"] for r in rows] == ["none", "topk"] and all(r["bench_img_s"] > 0 for r in rows)
    assert rows[1]["bench_compile"] is True and rows[1]["bench_compile_s"] is not None
    assert bench_points(model, planned, keys, settings, torch.device("cpu"), tmp_path, log=lambda m: None) == (1, 0)  # grid alone


def test_bench_pass_progress_reaches_its_total(setup, tmp_path):
    from tpool_cli.bench import BenchSettings
    from tpool_cli.sweep import SweepProgress

    class Recorder(SweepProgress):
        total, done = None, 0

        def bench_start(self, total_steps):
            self.total = total_steps

            def advance(n):
                self.done += n
            return advance

    loaded = load_model(CKPT_MODEL, weights=setup["ckpt"], img_size=64)
    rec = Recorder()
    run_sweep(loaded, setup["data"], plan_points(["topk", "grid"], [0.5]), tmp_path, class_map=setup["class_map"], limit=4,
              batch_size=4, workers=0, bench=BenchSettings(batch_size=2, warmup=0, steps=1, repeats=2), progress=rec)
    assert rec.total == 1 + 2 + 2 and rec.done == rec.total  # baseline, two points, two timed rounds


def test_points_that_fail_to_time_are_counted_logged_and_retried(tmp_path):
    from dataclasses import dataclass

    from conftest import tiny_vit
    from tpool_cli.bench import BenchSettings
    from tpool_cli.ops import make_operator
    from tpool_cli.ops.base import TokenOperator
    from tpool_cli.schedule import Schedule
    from tpool_cli.sweep import Point
    from tpool_cli.sweep_bench import bench_points

    @dataclass(frozen=True)
    class Broken(TokenOperator):
        name = "broken"

        def reduce(self, x, k, ctx):
            raise RuntimeError("boom")

    schedule = Schedule(keep=0.5, layers=(1,))
    planned = [(Point(), "p0"), (Point(Broken(), schedule), "p1"), (Point(make_operator("topk"), schedule), "p2")]
    keys = {k: f"b-{k}" for _, k in planned}
    logged: list[str] = []
    quick = BenchSettings(batch_size=2, warmup=0, steps=1, repeats=1)
    assert bench_points(tiny_vit(), planned, keys, quick, torch.device("cpu"), tmp_path, log=logged.append) == (3, 1)
    assert any("could not be timed: RuntimeError: boom" in m for m in logged)
    assert bench_points(tiny_vit(), planned, keys, quick, torch.device("cpu"), tmp_path, log=logged.append) == (1, 1)
