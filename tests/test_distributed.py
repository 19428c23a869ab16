"""`evaluate`, `pareto` and `recon` under torchrun (CPU, gloo): exactly the single-process numbers.

Each test starts ``python -m torch.distributed.run --standalone`` in a subprocess (one intra-op
thread per rank) on a few images of the built-in demo (the shipped digits ViT at keep 0.1, which
gets some images wrong and some outside its top-5, so top-1, top-5 and their counts all mean
something), and compares with the same evaluation run in this process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from tpool_cli.data import scan_folder
from tpool_cli.demo import DEMO_MODEL, ensure_demo_data
from tpool_cli.distributed import World, shard, world
from tpool_cli.evaluate import evaluate
from tpool_cli.models import load_model
from tpool_cli.patch import patch
from tpool_cli.sweep import plan_points, run_sweep

ROOT = Path(__file__).resolve().parents[1]
PICK = (0, 2, 32, 37, 38, 45)  # demo test images (sorted order): at keep 0.1 some right, some wrong
COUNTS = ("top1", "top5", "images", "correct1", "correct5", "skipped", "files")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """7 files in the demo's label space: 6 digits and one corrupt file (3 + 2 + 2 on 3 ranks)."""
    demo = ensure_demo_data()
    samples = scan_folder(demo.root, class_map=demo.class_map).samples
    root = tmp_path_factory.mktemp("digits")
    for i in PICK:
        target = root / samples[i].rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(samples[i].path, target)
    (root / samples[PICK[1]].rel).with_name("zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    shutil.copy(demo.class_map, root / "classes.txt")
    return root


def torchrun(nproc: int, *args: str, timeout: float = 240, popen: bool = False) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "tpool_cli", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TPOOL_DIST_TIMEOUT": "30"}
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def data_args(root: Path) -> list[str]:
    return ["--model", DEMO_MODEL, "--data", str(root), "--class-map", str(root / "classes.txt"),
            "--device", "cpu", "--batch-size", "2", "--workers", "0"]


def reference(root: Path, keep: float = 0.1, limit=None):
    loaded = load_model(DEMO_MODEL)
    patch(loaded.model, "topk", keep=keep)
    return evaluate(loaded, scan_folder(root, class_map=root / "classes.txt", limit=limit), device="cpu",
                    batch_size=2, workers=0).row()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:") or line.startswith("rank ")]


def test_shard_is_an_exact_partition(folder):
    f = scan_folder(folder, class_map=folder / "classes.txt")
    assert world() == World() and shard(f) is f  # alone: the folder itself, nothing joined
    for size in (2, 3, 8):
        shares = [f.samples[r::size] for r in range(size)]
        assert sorted((s.rel for part in shares for s in part)) == [s.rel for s in f.samples]
    assert [len(f.samples[r::8]) for r in range(8)] == [1] * 7 + [0]  # a rank with no image


def test_alone_combine_only_records_the_world_size(folder):
    row = reference(folder)
    assert row["world_size"] == 1 and "rank_model_only_img_s" not in row
    assert row["images"] == 6 and row["skipped"] == 1 and 0 < row["correct5"] - row["correct1"] < 6


def test_evaluate_three_ranks_uneven_with_a_corrupt_file(folder):
    proc = torchrun(3, "evaluate", *data_args(folder), "--op", "topk", "--keep", "0.1", "--format", "json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout)  # one JSON document: rank 0 alone printed
    ref = reference(folder)
    assert {k: row[k] for k in COUNTS} == {k: ref[k] for k in COUNTS}
    assert row["skipped_files"] == ref["skipped_files"] and len(row["skipped_files"]) == 1  # counted once
    assert row["world_size"] == 3 and len(row["rank_model_only_img_s"]) == 3
    assert row["model_only_img_s"] == pytest.approx(sum(row["rank_model_only_img_s"]), rel=1e-3)
    assert not error_lines(proc.stderr)


def test_evaluate_two_ranks_one_without_an_image(folder):
    proc = torchrun(2, "evaluate", *data_args(folder), "--op", "topk", "--keep", "0.1", "--limit", "1", "--format", "json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row, ref = json.loads(proc.stdout), reference(folder, limit=1)
    assert {k: row[k] for k in COUNTS} == {k: ref[k] for k in COUNTS} and row["images"] == 1
    assert row["rank_model_only_img_s"][1] is None  # rank 1 had nothing to time


def rows_by_point(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def single_sweep(root: Path, keeps: tuple[float, ...], out: Path) -> dict[str, dict]:
    loaded = load_model(DEMO_MODEL)
    res = run_sweep(loaded, scan_folder(root, class_map=root / "classes.txt"), plan_points(["topk"], keeps), out,
                    device="cpu", batch_size=2, workers=0)
    return {r["point"]: r for r in res.rows}


def test_pareto_three_ranks_one_row_per_point(folder, tmp_path):
    out = tmp_path / "sweep"
    proc = torchrun(3, "pareto", *data_args(folder), "--ops", "topk", "--keep", "1.0,0.5,0.1", "--out", str(out), "--format", "json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = rows_by_point(out)
    ref = single_sweep(folder, (1.0, 0.5, 0.1), tmp_path / "single")
    assert sorted(r["point"] for r in rows) == sorted(ref) and len(rows) == 3
    for r in rows:
        assert {k: r[k] for k in COUNTS} == {k: ref[r["point"]][k] for k in COUNTS}
        assert r["world_size"] == 3
        assert r["key"] == ref[r["point"]]["key"]  # the world size is not part of an accuracy point's key
    assert json.loads(proc.stdout)["out"] == str(out) and (out / "pareto.md").is_file()
    assert not list(out.glob("*.tmp"))


def _ranks_of(agent: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes torchrun's agent started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in kv)
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent and "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def test_a_rank_killed_mid_sweep_fails_once_and_resumes_each_point_once(folder, tmp_path):
    out = tmp_path / "sweep"
    keeps = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
    args = ("pareto", *data_args(folder), "--ops", "topk", "--keep", ",".join(map(str, keeps)), "--out", str(out), "--format", "json")
    proc = torchrun(2, *args, popen=True)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 240
    while not (results.is_file() and results.read_text().count("\n") >= 1) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks = _ranks_of(proc.pid)
    assert proc.poll() is None and 1 in ranks, "the sweep ended before a rank could be killed"
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.monotonic() - killed < 60
    ours = error_lines(stderr)
    assert len(ours) == 1 and ours[0].startswith("error: distributed:"), stderr[-3000:]
    written = rows_by_point(out)
    assert 1 <= len(written) < len(keeps)

    again = torchrun(2, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = rows_by_point(out)
    assert len(rows) == len(keeps) and len({r["key"] for r in rows}) == len(keeps)  # each point once
    assert rows[: len(written)] == written  # nothing written was lost or rewritten
    ref = single_sweep(folder, keeps, tmp_path / "single")
    for r in rows:
        assert {k: r[k] for k in COUNTS} == {k: ref[r["point"]][k] for k in COUNTS}


def test_bad_input_fails_on_every_rank_with_one_line(folder, tmp_path):
    proc = torchrun(2, "evaluate", *data_args(tmp_path / "missing"), timeout=180)
    assert proc.returncode != 0
    ours = error_lines(proc.stderr)
    assert ours == [f"error: data folder not found: {tmp_path / 'missing'}"], proc.stderr[-3000:]
    assert "tpool_cli/" not in proc.stderr  # no traceback from a rank (torchrun's own summary follows)
    # torchrun's summary: every rank failed with our exit code, within seconds of each other
    ranks = [int(m) for m in re.findall(r"rank\s+: (\d+) \(local_rank", proc.stderr)]
    codes = [int(m) for m in re.findall(r"exitcode\s+: (-?\d+)", proc.stderr)]
    stamps = [datetime.strptime(t, "%Y-%m-%d_%H:%M:%S") for t in re.findall(r"time\s+: (\S+)", proc.stderr)]
    assert sorted(ranks) == [0, 1] and codes == [2, 2], proc.stderr[-3000:]
    assert (max(stamps) - min(stamps)).total_seconds() <= 35  # TPOOL_DIST_TIMEOUT=30 bounds the wait


def test_bench_refuses_under_torchrun(monkeypatch):
    from tpool_cli.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exc:
            main(["bench", "--model", DEMO_MODEL, "--device", "cpu"])
    finally:
        signal.signal(signal.SIGTERM, handler)  # main() installed torchrun's SIGTERM handling
    assert exc.value.code == 2
