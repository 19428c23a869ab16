"""`tpool pareto --finetune-epochs`: fine-tuned points next to the off-the-shelf ones, distinct keys,
everything reused on a rerun, off-the-shelf keys unchanged, the report draws both."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from tpool_cli.errors import TpoolError
from tpool_cli.finetune import DEMO_FINETUNE_DEFAULTS, FinetuneSettings
from tpool_cli.ops import make_operator
from tpool_cli.schedule import Schedule
from tpool_cli.store import KEY_FIELDS, point_key
from tpool_cli.sweep_finetune import finetune_identity, sweep_finetune_settings, train_folder, with_finetuned
from tpool_cli.sweep_plan import Point


def _tpool(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tpool_cli", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_a_demo_sweep_fine_tunes_the_point_next_to_its_off_the_shelf_row_and_reuses_it(tmp_path):
    args = ("pareto", "--ops", "kmeans", "--keep", "0.5", "--finetune-epochs", "1", "--finetune-max-steps", "2",
            "--limit", "60", "--out", str(tmp_path))
    proc = _tpool(*args)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["op"] for r in rows] == ["none", "kmeans", "kmeans"]
    shelf, tuned = rows[1], rows[2]
    assert "finetune" not in shelf and tuned["finetune"]["epochs"] == 1 and tuned["finetune"]["updates"] == 2
    assert tuned["finetune"]["recipe"]["lr"] == DEMO_FINETUNE_DEFAULTS["lr"]  # the demo's recipe
    assert shelf["key"] != tuned["key"] and point_key(tuned) == tuned["key"] and point_key(shelf) == shelf["key"]
    assert shelf["schedule"] == tuned["schedule"] and shelf["gmacs"] == tuned["gmacs"]
    weights = tmp_path / "finetune" / tuned["key"] / "model.safetensors"
    assert weights.is_file() and (tmp_path / "finetune" / tuned["key"] / "last.pt").is_file()
    md = (tmp_path / "pareto.md").read_text()
    assert "kmeans +ft 1 ep" in md and "fine-tuned: 1 point(s)" in md
    assert (tmp_path / "top1_vs_gmacs.svg").is_file()
    stamp = weights.stat().st_mtime_ns
    again = _tpool(*args)  # the same command: every point reused, nothing trained again
    assert again.returncode == 0, again.stderr
    assert "reused 3 point(s)" in again.stderr and "evaluated 0" in again.stderr
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3
    assert weights.stat().st_mtime_ns == stamp
    report = _tpool("report", str(tmp_path))  # torch-free rebuild draws both
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "pareto.md").read_text() == md


def _old_key(row: dict) -> str:
    """point_key as it was before fine-tuned points existed (no 'finetune' field at all)."""
    ident = {k: row.get(k) for k in KEY_FIELDS if k not in ("weights_id", "finetune")}
    ident["weights_id"] = row.get("weights_sha256") or row.get("weights")
    if ident["r"] is None:
        del ident["r"]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:20]


def test_off_the_shelf_keys_are_unchanged_and_a_recipe_changes_the_key():
    row = {"model": "m", "weights_sha256": "abc", "data_fingerprint": "f", "op": "kmeans", "keep": 0.5,
           "layers": [1, 2], "dtype": "fp32", "device": "cpu", "seed": 0, "torch": "2", "timm": "1", "tpool": "0"}
    assert point_key(row) == _old_key(row) == point_key({**row, "finetune": None})
    # `tpool finetune`'s own rows carry a finetune record without a recipe: their keys do not move either
    assert point_key({**row, "finetune": {"finetune": {}, "updates": 3}}) == _old_key(row)
    one = {**row, "finetune": finetune_identity(FinetuneSettings(epochs=1), "t")}
    two = {**row, "finetune": finetune_identity(FinetuneSettings(epochs=2), "t")}
    other_data = {**row, "finetune": finetune_identity(FinetuneSettings(epochs=1), "u")}
    assert len({point_key(row), point_key(one), point_key(two), point_key(other_data)}) == 4
    # how far a run got and where it wrote are not part of the key
    assert point_key({**one, "finetune": {**one["finetune"], "updates": 9, "weights_finetuned": "x"}}) == point_key(one)


def test_the_recipe_and_points_of_a_fine_tuned_sweep():
    assert sweep_finetune_settings(0, demo=True) is None
    demo = sweep_finetune_settings(3, demo=True, max_steps=2, seed=4)
    assert (demo.epochs, demo.lr, demo.crop_scale, demo.hflip, demo.max_steps, demo.seed) == (3, 5e-4, 0.75, 0.0, 2, 4)
    other = sweep_finetune_settings(3, demo=False, lr=2e-4)
    assert (other.lr, other.crop_scale, other.hflip) == (2e-4, FinetuneSettings().crop_scale, FinetuneSettings().hflip)
    points = [Point(), Point(make_operator("kmeans"), Schedule(keep=0.5))]
    assert with_finetuned(points, None) == points
    both = with_finetuned(points, demo)
    assert both[:2] == points and len(both) == 3 and both[2].finetune == demo and both[2].operator == points[1].operator
    assert both[2].label(4).endswith("+ft 3 ep")


def test_bad_fine_tune_requests_are_one_clear_error():
    with pytest.raises(TpoolError, match="--finetune-epochs E > 0"):
        sweep_finetune_settings(0, demo=True, lr=1e-3)
    with pytest.raises(TpoolError, match="--train goes with"):
        train_folder("somewhere", demo=False, class_map=None, settings=None)
    with pytest.raises(TpoolError, match="needs --train"):
        train_folder(None, demo=False, class_map=None, settings=FinetuneSettings(epochs=1))


def test_a_sweep_killed_mid_fine_tune_continues_that_fine_tune(tmp_path):
    from dataclasses import replace

    from tpool_cli.data import scan_folder
    from tpool_cli.demo import DEMO_MODEL, ensure_demo_data
    from tpool_cli.models import load_model
    from tpool_cli.sweep import SweepProgress, run_sweep
    from tpool_cli.sweep_plan import plan_points

    test, split = ensure_demo_data(), ensure_demo_data(split="train")
    train = scan_folder(split.root, class_map=split.class_map)
    train = replace(train, samples=train.samples[::48][:30])  # every class, two batches an epoch
    recipe = FinetuneSettings(epochs=2, batch_size=16, lr=5e-4, warmup_epochs=0.0, crop_scale=1.0, hflip=0.0)
    points = with_finetuned(plan_points(["kmeans"], [0.5]), recipe)

    class KillInSecondEpoch(SweepProgress):
        def point(self, label, total_images):
            seen = [0]

            def advance(n):
                seen[0] += n
                if label.startswith("fine-tune") and seen[0] > len(train):
                    raise KeyboardInterrupt

            return advance

    def sweep(progress=None):
        return run_sweep(load_model(DEMO_MODEL), test.root, points, tmp_path, class_map=test.class_map, limit=20,
                         batch_size=16, workers=0, train=train, progress=progress)

    first = sweep(KillInSecondEpoch())
    assert first.interrupted and [r["op"] for r in first.rows] == ["none", "kmeans"]
    second = sweep()
    tuned = second.rows[-1]["finetune"]
    assert second.evaluated == 1 and (tuned["resumed_epochs"], tuned["epochs_done"], tuned["updates"]) == (1, 2, 4)
