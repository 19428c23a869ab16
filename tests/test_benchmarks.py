"""The benchmark scripts still run (tiny settings, CPU): a GPU session must not find them broken.

Only that they run and print their tables; their figures are timings on a shared CPU and are not
asserted (benchmarks print ratios measured in one run; tests assert behaviour).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def script(name: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.parametrize(
    "name, args, expected",
    [
        ("operators.py", ["--device", "cpu", "--batch", "1", "--repeats", "1", "--warmup", "0", "--ops", "topk,kmeans,tome"],
         ["| kmeans | 137 |", "reducing block / ideal"]),
        ("distance_precision.py", ["--device", "cpu", "--batch", "1"], ["bf16 equal to fp32"]),
        ("atc_reference.py", ["--batch", "2", "--repeats", "1", "--warmup", "0"],
         ["same partition as the reference (up to relabelling): 2 of 2 images", "| tpool atc |"]),
        ("gpu.py", ["--device", "cpu", "--model", "tpool_digits_vit", "--batch-size", "2", "--steps", "1", "--repeats", "1",
                    "--warmup", "0", "--mode", "eager", "--keep", "0.5", "--ops", "topk,kmeans", "--no-gmacs"],
         ["| ideal (free reduction) | 0.5 |", "| kmeans | 0.5 |"]),
        ("finetune.py", ["--batch", "4", "--steps", "1", "--repeats", "1", "--warmup", "0", "--ops", "kmeans", "--keep", "0.5"],
         ["| kmeans keep 0.5 |", "vs unpatched"]),
        ("sweep.py", ["--images", "8", "--ops", "topk", "--keep", "0.5", "--batch-size", "4", "--workers", "0"],
         ["same top-1 for every point: True"]),
    ],
)
def test_benchmark_script_runs(name, args, expected):
    out = script(name, *args)
    for text in expected:
        assert text in out, out[-3000:]


@pytest.mark.skipif(not all(shutil.which(tool) for tool in ("bash", "timeout", "tee")), reason="needs bash and coreutils")
def test_gpu_run_script_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu_run.sh is run once per GPU session, unattended: every section must work."""
    env = {**os.environ, "OUT": str(tmp_path), "DEVICE": "cpu", "MODEL": "tpool_digits_vit", "BATCH": "2", "STEPS": "1",
           "KEEPS": "0.5", "OPS": "topk", "COMPILE_BACKEND": "aot_eager", "EAGER_BUDGET": "20", "COMPILE_BUDGET": "20",
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh")], capture_output=True, text=True, timeout=600,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    sections = dict(line.split(" ", 1) for line in (tmp_path / "sections.txt").read_text().splitlines())
    assert set(sections) == {"env", "eager", "operators_0.7", "operators_0.5", "distance_precision", "cli_bench",
                             "pareto_bench", "compile", "render"}
    assert all(v.startswith("rc=0 ") for k, v in sections.items() if k != "env"), sections  # env: no nvidia-smi here
    table = (tmp_path / "gpu.md").read_text()
    assert "| topk | 0.5 |" in table and "compiled img/s" in table
    assert "| topk |" in (tmp_path / "operators_0.7.md").read_text()
    assert '"op_vs_ideal"' in (tmp_path / "cli_bench.json").read_text()
    assert "- bench: " in (tmp_path / "pareto_bench" / "pareto.md").read_text()
