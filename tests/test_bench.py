"""`tpool bench` and its library: well-formed rows, shared references, honest bookkeeping.

No timed assertions: throughput on a shared CPU says nothing; the tests check what is measured,
not how fast it is.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from conftest import tiny_vit
from tpool_cli.bench import BenchSettings, bench
from tpool_cli.device import resolve_amp, resolve_device
from tpool_cli.cli import main
from tpool_cli.errors import TpoolError
from tpool_cli.ops import make_operator
from tpool_cli.ops.base import ReduceContext, Reduction, TokenOperator
from tpool_cli.patch import is_patched
from tpool_cli.profile import build_configs
from tpool_cli.schedule import Schedule



def tpool(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tpool_cli", *args], capture_output=True, text=True, timeout=300, env=env)


QUICK = BenchSettings(batch_size=2, warmup=0, steps=1, repeats=2)
ROW_FIELDS = {
    "model", "op", "keep", "layers", "schedule", "tokens_per_block", "batch_size", "img_size", "device", "device_name",
    "amp", "compile", "baseline_img_s", "ideal_img_s", "op_img_s", "op_vs_baseline", "op_vs_ideal", "ideal_vs_baseline",
    "baseline_gmacs", "ideal_gmacs", "op_gmacs", "baseline_compile_s", "ideal_compile_s", "op_compile_s", "error",
}


def test_drop_keeps_the_first_k_tokens():
    x = torch.randn(2, 6, 4)
    sizes = torch.arange(12, dtype=torch.float32).view(2, 6)
    out = make_operator("drop")(x, 4, ReduceContext(sizes=sizes, track=True))
    assert torch.equal(out.tokens, x[:, :4]) and torch.equal(out.sizes, sizes[:, :4])
    assert out.assignment.tolist() == [[0, 1, 2, 3, -1, -1]] * 2
    assert make_operator("drop").needs() == frozenset()  # fused attention in every block


def test_ratios_pair_the_runs_of_a_round():
    """A machine twice as slow in round 2 slows both variants: the paired ratio sees no change."""
    from tpool_cli.bench import paired_ratio

    assert paired_ratio([10.0, 5.0, 10.0], [20.0, 10.0, 20.0]) == 0.5
    assert paired_ratio([10.0, 5.0, 5.0], [20.0, 10.0, 20.0]) == 0.5  # the ratio of the medians would say 5 / 20
    assert paired_ratio([12.0, 6.0, 11.0], [10.0, 10.0, 10.0]) == pytest.approx(1.1)
    assert paired_ratio([12.0, 6.0], [10.0, 10.0, 10.0]) == pytest.approx(0.9)  # unequal runs: medians
    assert paired_ratio([], [1.0]) is None


def test_rows_are_complete_and_consistent():
    model = tiny_vit()
    configs = build_configs(["topk", "grid", "random"], (0.5,), (1, 2), None)
    report = bench(model, configs, QUICK, "cpu")
    payload = json.loads(json.dumps(report.payload("tiny")))  # JSON-able all the way down
    rows = payload["results"]
    assert [r["op"] for r in rows] == ["topk", "grid", "random"]
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["error"] is None and r["device"] == "cpu" and r["compile"] is False and r["op_compile_s"] is None
        for key in ("baseline_img_s", "ideal_img_s", "op_img_s"):
            assert r[key] > 0 and math.isfinite(r[key])
        # ratios pair the runs of each round (two rounds: the median is their mean)
        ideal_runs = next(i["runs_img_per_s"] for i in payload["ideals"] if i["tokens_per_block"] == r["tokens_per_block"])
        base_runs = payload["baseline"]["runs_img_per_s"]
        want = sum(o / i for o, i in zip(r["op_runs_img_s"], ideal_runs)) / 2
        assert r["op_vs_ideal"] == pytest.approx(want, rel=2e-3)
        assert r["op_vs_baseline"] == pytest.approx(sum(o / b for o, b in zip(r["op_runs_img_s"], base_runs)) / 2, rel=2e-3)
        # FLOPs: the ideal has the operator's token counts and costs no more than the operator
        assert r["ideal_gmacs"] <= r["op_gmacs"] < r["baseline_gmacs"]
        assert len(r["tokens_per_block"]) == 4
    assert rows[0]["tokens_per_block"] == [64, 32, 16, 16]
    assert rows[1]["tokens_per_block"] == [64, 30, 16, 16]  # grid realises 5x6 then 4x4
    # baseline once; one ideal per distinct token path, shared by the operators that run it
    assert len(payload["ideals"]) == 2
    assert report.rows[0].ideal is report.rows[2].ideal and report.rows[1].ideal is not report.rows[0].ideal
    assert report.rows[0].ideal.tokens_per_block == rows[0]["tokens_per_block"]
    assert len({id(r.baseline) for r in report.rows}) == 1
    assert not is_patched(model) and not model.training


def test_eager_runs_are_interleaved_and_all_kept():
    seen = []
    settings = BenchSettings(batch_size=2, warmup=0, steps=1, repeats=3)
    report = bench(tiny_vit(), build_configs(["topk"], (0.5,), (1, 2), None), settings, "cpu", progress=seen.append)
    rounds = [i for i, m in enumerate(seen) if m.startswith("timed round")]
    assert len(rounds) == 3 and rounds[0] > max(i for i, m in enumerate(seen) if m.startswith("warming up"))
    for v in (report.baseline, report.rows[0].ideal, report.rows[0].operator):
        assert len(v.timing.runs_img_per_s) == 3 and v.timing.img_per_s == sorted(v.timing.runs_img_per_s)[1]


def test_deadline_skips_what_has_not_started():
    import time

    updates = []
    report = bench(tiny_vit(), build_configs(["topk", "grid"], (0.5,), (1, 2), None), QUICK, "cpu",
                   deadline=time.monotonic() - 1, on_update=lambda r: updates.append(len(r.rows)))
    rows = report.payload("tiny")["results"]
    assert [r["error"] for r in rows] == ["skipped: time budget"] * 2 and rows[0]["op_img_s"] is None
    assert report.baseline.timing.img_per_s > 0  # the baseline always runs
    assert updates[:3] == [0, 1, 2]  # after the baseline and after each row


def test_keep_one_reuses_the_baseline_as_ideal():
    report = bench(tiny_vit(), [(make_operator("topk"), Schedule(keep=1.0))], QUICK, "cpu")
    assert report.rows[0].ideal is report.baseline and report.ideals == {(64, 64, 64, 64): report.baseline}


def test_compiled_variants_report_compile_time_and_one_graph():
    settings = BenchSettings(batch_size=2, warmup=1, steps=1, repeats=1, compile=True, compile_backend="aot_eager")
    report = bench(tiny_vit(), build_configs(["random"], (0.5,), (1, 2), None), settings, "cpu")
    row = report.payload("tiny")["results"][0]
    assert row["compile"] is True and row["compile_mode"] == "default"
    assert all(row[k] > 0 for k in ("baseline_compile_s", "ideal_compile_s", "op_compile_s"))
    assert row["op_graphs"] == 1 and row["op_recompiled"] == 0  # whole forward in one graph, reused


@dataclass(frozen=True)
class Broken(TokenOperator):
    name = "broken"

    def reduce(self, x: torch.Tensor, k: int, ctx: ReduceContext) -> Reduction:
        raise RuntimeError("boom")


def test_a_failing_operator_is_recorded_or_raised():
    configs = [(Broken(), Schedule(keep=0.5, layers=(1,))), (make_operator("topk"), Schedule(keep=0.5, layers=(1,)))]
    model = tiny_vit()
    report = bench(model, configs, QUICK, "cpu", errors="record")
    rows = report.payload("tiny")["results"]
    assert rows[0]["error"] == "RuntimeError: boom" and rows[0]["op_img_s"] is None and rows[0]["ideal_img_s"] > 0
    assert rows[1]["error"] is None and rows[1]["op_img_s"] > 0
    assert not is_patched(model)
    with pytest.raises(RuntimeError, match="boom"):
        bench(model, configs, QUICK, "cpu")
    assert not is_patched(model)


def test_bad_requests_fail_before_timing():
    with pytest.raises(TpoolError, match="out of range"):
        bench(tiny_vit(), build_configs(["topk"], (0.5,), (1, 9), None), QUICK, "cpu")
    with pytest.raises(TpoolError, match="--steps must be >= 1"):
        BenchSettings(steps=0)
    with pytest.raises(TpoolError, match="--compile-mode"):
        BenchSettings(compile_mode="fast")
    with pytest.raises(TpoolError, match="unknown --amp"):
        resolve_amp("fp8", torch.device("cpu"))
    assert resolve_amp(None, torch.device("cpu")) is None and resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(TpoolError, match="unknown device"):
        resolve_device("tpu")


def test_cli_prints_wellformed_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = tpool(
        "bench", "--model", "deit_tiny_patch16_224", "--img-size", "32", "-b", "2", "--op", "topk,random",
        "--keep", "0.7,0.5", "--warmup", "0", "--steps", "1", "--repeats", "1", "--format", "json", "--output", str(out),
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload == json.loads(out.read_text())
    assert payload["model"] == "deit_tiny_patch16_224" and payload["img_size"] == 32 and payload["batch_size"] == 2
    assert payload["baseline"]["img_per_s"] > 0 and payload["baseline"]["gmacs"] > 0
    rows = payload["results"]
    assert [(r["op"], r["keep"]) for r in rows] == [("topk", 0.7), ("topk", 0.5), ("random", 0.7), ("random", 0.5)]
    for r in rows:
        assert ROW_FIELDS <= set(r) and r["error"] is None and r["op_vs_ideal"] > 0 and r["op_vs_baseline"] > 0
    assert "warming up baseline" in proc.stderr and "timed round 1/1" in proc.stderr  # progress on stderr, data on stdout


def test_cli_table(tmp_path):
    proc = tpool("bench", "--model", "deit_tiny_patch16_224", "--img-size", "32", "-b", "1", "--op", "grid",
                 "--keep", "0.5", "--warmup", "0", "--steps", "1", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr
    assert "op/ideal" in proc.stdout and "grid" in proc.stdout and "baseline img/s" in proc.stdout


def test_rows_carry_the_speed_flag_and_the_table_shows_it(monkeypatch, capsys):
    """Issue 16: a bench figure says how sure it is: spread of its runs, the machine's load, the flag
    (speedflags.py, the fields a sweep's bench rows carry), in the payload and in `tpool bench`'s table."""
    import tpool_cli.bench as bench_module
    from tpool_cli.speedflags import speed_flag, spread

    busy = {"cores": 2, "threads": 1, "wait_policy": None, "load1": 9.5}
    monkeypatch.setattr(bench_module, "machine_load", lambda *args, **kwargs: busy)
    report = bench(tiny_vit(), [(make_operator("topk"), Schedule(keep=0.5))], QUICK, "cpu", count_gmacs=False)
    payload = report.payload("tiny")
    (row,) = payload["results"]
    assert row["bench_spread"] == spread(row["op_runs_img_s"]) and len(row["op_runs_img_s"]) == 2
    assert row["bench_load"] == busy and row["bench_flag"] == speed_flag(row["bench_spread"], busy)
    assert "busy: load 9.50 on 2 cores" in row["bench_flag"] and "busy: load 9.50" in payload["baseline"]["bench_flag"]
    monkeypatch.setattr(bench_module, "spread", lambda runs: 0.05)  # a steady figure: the flag says only "busy"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--model", "deit_tiny_patch16_224", "--img-size", "32", "-b", "1", "--op", "grid", "--keep", "0.5",
              "--warmup", "0", "--steps", "1", "--repeats", "2"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "spread" in out and "notes" in out and re.search(r"│\s+5% │", out)
    assert "│ busy: load 9.50 on 2 cores │" in out and "spread 5%; baseline busy: load 9.50 on 2 cores" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--model", "deit_tiny_patch16_224", "--device", "cuda"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0]


@pytest.mark.parametrize(
    "args, message",
    [(["--batch-size", "0"], "--batch-size must be >= 1"), (["--amp", "fp8"], "unknown --amp"),
     (["--compile-mode", "fast"], "--compile-mode must be one of"), (["--device", "tpu"], "unknown device")],
)
def test_cli_bad_input_is_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--model", "deit_tiny_patch16_224", "--img-size", "32", *args])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_gpu_script_runs_both_modes_and_renders(tmp_path):
    """benchmarks/gpu.py end to end on a CPU, tiny: JSON per mode, one merged Markdown table."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("gpu_bench_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    common = ["--device", "cpu", "--model", "deit_tiny_patch16_224", "--img-size", "32", "--batch-size", "2",
              "--ops", "topk,grid", "--keep", "0.5", "--warmup", "0", "--steps", "1", "--repeats", "1", "--out", str(tmp_path)]
    script.main(["--mode", "eager", *common])
    (tmp_path / "fake.json").write_text(json.dumps({"results": [{"op": "grid", "error": "RuntimeError: x"}]}))
    script.main(["--mode", "compile", "--compile-backend", "aot_eager", "--no-gmacs", "--skip-failed", str(tmp_path / "fake.json"), *common])
    eager = json.loads((tmp_path / "eager.json").read_text())
    compiled = json.loads((tmp_path / "compile.json").read_text())
    assert eager["finished"] and compiled["finished"] and compiled["skipped_after_eager_failure"] == ["grid"]
    assert [r["op"] for r in eager["results"]] == ["topk", "grid"] and [r["op"] for r in compiled["results"]] == ["topk"]
    table = (tmp_path / "gpu.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    # header, baseline, one ideal (at 32 px grid realises the same 4→2→1 path as topk), 2 operators
    assert lines[0].startswith("| variant | keep") and len(lines) == 1 + 1 + 1 + 2
    topk = next(line for line in lines if line.startswith("| topk"))
    cells = [c.strip() for c in topk.strip("|").split("|")]
    assert cells[4] and cells[7], "topk has eager and compiled throughput"
    assert "not compiled (failed in eager): grid" in table


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_steady_host_allocator_stops_page_faults_on_repeated_big_tensors():
    """Timed CPU forwards must not page-fault their activations in again on every call."""
    import platform
    import resource

    from tpool_cli.device import steady_host_allocator

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert steady_host_allocator() and steady_host_allocator()  # idempotent

    def faults_per_alloc(nbytes: int, n: int = 10) -> float:
        for _ in range(2):
            t = torch.empty(nbytes // 4)
            t.fill_(1.0)
            del t
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            t = torch.empty(nbytes // 4)
            t.fill_(1.0)
            del t
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n

    pages = (64 << 20) // 4096
    assert faults_per_alloc(64 << 20) < pages / 4  # glibc's default: one fault per 4 KiB page, every time


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_release_host_memory_gives_freed_memory_back():
    import platform

    from tpool_cli.device import release_host_memory, steady_host_allocator

    if platform.libc_ver()[0] != "glibc" or not steady_host_allocator():
        pytest.skip("not glibc")

    def rss_mib() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20

    big = torch.ones((256 << 20) // 4)
    pinned_above = torch.ones(1024)  # a live block above it: the freed one is not at the top of the heap
    del big
    held = rss_mib()
    assert release_host_memory()
    assert held - rss_mib() > 128  # most of the 256 MiB left the process
    del pinned_above


def test_compiled_ratios_are_not_paired_by_index():
    """Compiled variants are timed back to back: their ratio is the ratio of the medians."""
    from tpool_cli.bench import paired_ratio

    assert paired_ratio([10.0, 5.0, 5.0], [20.0, 10.0, 20.0], paired=False) == 0.25
