"""`tpool evaluate`: label mapping proven with checkpoints made here, skipped files, errors, cache equality."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from imagefolders import (
    CKPT_MODEL, constant_checkpoint, foolbox_images, imagenet_folder, photos_as, random_checkpoint, synsets,
)
from tpool_cli.cli import main
from tpool_cli.data import data_config, decode_once, scan_folder
from tpool_cli.evaluate import _model_only, evaluate
from tpool_cli.models import file_sha256, load_model
from tpool_cli.patch import patch

CLASS = 559  # the constant checkpoint always predicts this ImageNet class


@pytest.fixture(scope="module")
def const_ckpt(tmp_path_factory):
    return constant_checkpoint(tmp_path_factory.mktemp("ckpt") / "const559.safetensors", CLASS)


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "random64.safetensors", img_size=64)


def tpool(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tpool_cli", *args], capture_output=True, text=True, timeout=180, env=env)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def ckpt_args(ckpt) -> list[str]:
    return ["evaluate", "--model", CKPT_MODEL, "--img-size", "32", "--weights", str(ckpt), "-j", "0", "-b", "4"]


def test_weights_checkpoint_scores_100_on_its_wnid_and_0_on_another(tmp_path, const_ckpt):
    """End to end in a real process: --weights loading and the wnid -> index mapping, one class per folder."""
    own = photos_as(tmp_path / "own", synsets()[CLASS], 3)
    other = photos_as(tmp_path / "other", synsets()[CLASS + 1], 3)
    proc = tpool(*ckpt_args(const_ckpt), "--data", str(own), "--op", "topk", "--keep", "0.5", "-f", "json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert (row["top1"], row["top5"], row["images"], row["skipped"]) == (100.0, 100.0, 3, 0)
    assert row["weights"] == str(const_ckpt) and row["weights_sha256"] == file_sha256(const_ckpt)
    assert (row["op"], row["keep"], row["layers"], row["img_size"]) == ("topk", 0.5, [3, 6, 9], 32)
    assert row["gmacs"] < row["baseline_gmacs"] and row["dtype"] == "fp32" and row["device"] == "cpu"
    assert row["model_only_img_s"] > 0 and row["end_to_end_img_s"] > 0

    proc = tpool(*ckpt_args(const_ckpt), "--data", str(other), "-f", "json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert (row["top1"], row["images"], row["op"]) == (0.0, 3, "none")


def test_mixed_folder_scores_exactly_the_photos_of_the_class(tmp_path):
    """Among foolbox's 20 photos two are class 609: a checkpoint predicting 609 scores 2/20."""
    ckpt = constant_checkpoint(tmp_path / "c609.safetensors", 609)
    loaded = load_model(CKPT_MODEL, weights=ckpt, img_size=32)
    result = evaluate(loaded, imagenet_folder(tmp_path / "val"), workers=0, batch_size=8)
    assert (result.correct1, result.images, result.top1) == (2, 20, 10.0)
    assert result.config["label_space"] == "imagenet-1k synsets (timm)"


def test_class_map_label_space_end_to_end(tmp_path, const_ckpt, capsys):
    (tmp_path / "map.txt").write_text("\n".join(str(i) for i in range(1000)) + "\n")
    photos_as(tmp_path / "digits", str(CLASS), 2)
    photos_as(tmp_path / "digits", "7", 2)
    code, out, err = run([*ckpt_args(const_ckpt), "--data", str(tmp_path / "digits"), "--class-map", str(tmp_path / "map.txt"), "-f", "json"], capsys)
    assert code == 0, err
    row = json.loads(out)
    assert (row["top1"], row["images"], row["label_space"]) == (50.0, 4, "class map map.txt")


def test_unreadable_files_are_skipped_and_listed(tmp_path, const_ckpt, capsys):
    root = photos_as(tmp_path / "val", synsets()[CLASS], 2)
    folder = root / synsets()[CLASS]
    (folder / "corrupt.JPEG").write_bytes(foolbox_images()[0][0].read_bytes()[:500])
    (folder / "readme.txt").write_text("not an image")
    out_csv = tmp_path / "r.csv"
    code, out, err = run([*ckpt_args(const_ckpt), "--data", str(root), "-f", "json", "-o", str(out_csv)], capsys)
    assert code == 0, err
    row = json.loads(out)
    assert (row["images"], row["skipped"], row["top1"], row["files"]) == (2, 2, 100.0, 4)
    reasons = {s["path"]: s["reason"] for s in row["skipped_files"]}
    assert set(reasons) == {f"{synsets()[CLASS]}/corrupt.JPEG", f"{synsets()[CLASS]}/readme.txt"}
    assert "skipped 2 unreadable file(s)" in err
    assert out_csv.read_text().splitlines()[0].startswith("model,weights,")


def test_table_output_and_random_init_flag(tmp_path, capsys):
    root = photos_as(tmp_path / "val", synsets()[1], 2)
    code, out, err = run(["evaluate", "--model", CKPT_MODEL, "--img-size", "32", "--random-init", "--data", str(root), "-j", "0", "--op", "grid", "--keep", "0.5"], capsys)
    assert code == 0, err
    assert "RANDOM WEIGHTS" in out and "RANDOM WEIGHTS" in err
    assert "top-1 %" in out and "model-only img/s" in out and "4→2→1" in out


@pytest.mark.parametrize(
    "setup, extra, message",
    [
        ("empty", [], "no images under"),
        ("unknown", [], "unknown names (dogs)"),
        ("unreadable", [], "none of the 1 files"),
        ("missing", [], "data folder not found"),
        ("beyond_head", ["--class-map", "{tmp}/big_map.txt"], "but the model has 1000 classes"),
        ("ok", ["--device", "cuda"], "CUDA is not available"),
        ("ok", ["--device", "tpu"], "unknown device"),
        ("ok", ["--amp", "fp16"], "--amp fp16 needs CUDA"),
        ("ok", ["--op", "topk,grid"], "evaluate runs one operator"),
        ("ok", ["--keep", "0.9,0.7", "--op", "topk"], "evaluate runs one keep rate"),
        ("ok", ["--limit", "0"], "--limit must be >= 1"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, const_ckpt, capsys, setup, extra, message):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    data = tmp_path / "data"
    if setup == "empty":
        (data / synsets()[3]).mkdir(parents=True)
    elif setup == "unknown":
        photos_as(data, synsets()[3], 1)
        photos_as(data, "dogs", 1)
    elif setup == "unreadable":
        (data / synsets()[3]).mkdir(parents=True)
        (data / synsets()[3] / "x.jpg").write_bytes(b"nope")
    elif setup == "beyond_head":
        (tmp_path / "big_map.txt").write_text("\n".join(f"c{i}" for i in range(1001)) + "\n")
        photos_as(data, "c1000", 1)
    elif setup == "ok":
        photos_as(data, synsets()[3], 1)
    code, out, err = run([*ckpt_args(const_ckpt), "--data", str(data), *[e.format(tmp=tmp_path) for e in extra]], capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert message in lines[-1] and lines[-1].startswith("error:") and "Traceback" not in err
    assert out == ""


def test_data_is_required(capsys):
    code, _, err = run(["evaluate", "--model", CKPT_MODEL, "--random-init"], capsys)
    assert code == 2 and "--data DIR is required" in err


@pytest.mark.parametrize("op", ["none", "topk", "grid", "random"])
def test_cached_and_uncached_predictions_are_identical(tmp_path, random_ckpt, op):
    loaded = load_model(CKPT_MODEL, weights=random_ckpt, img_size=64)
    if op != "none":
        patch(loaded.model, op, keep=0.6)
    folder = scan_folder(imagenet_folder(tmp_path / "val"), limit=11)
    uncached = evaluate(loaded, folder, workers=0, batch_size=4, keep_predictions=True, count=False)
    if op != "none":
        patch(loaded.model, op, keep=0.6)  # a fresh seeded generator for `random`

    cache = decode_once(folder, data_config(loaded.model), batch_size=5, workers=0)
    cached = evaluate(loaded, cache, batch_size=4, keep_predictions=True, count=False)
    assert torch.equal(uncached.predictions, cached.predictions)
    assert torch.equal(uncached.prediction_indices, cached.prediction_indices)
    assert (uncached.top1, uncached.top5, uncached.images) == (cached.top1, cached.top5, cached.images)
    assert len(set(cached.predictions.tolist())) > 1  # a real model: predictions differ between images


def test_loader_workers_give_the_same_predictions(tmp_path, random_ckpt):
    loaded = load_model(CKPT_MODEL, weights=random_ckpt, img_size=64)
    folder = scan_folder(imagenet_folder(tmp_path / "val"), limit=8)
    a = evaluate(loaded, folder, workers=0, batch_size=4, keep_predictions=True, count=False)
    b = evaluate(loaded, folder, workers=2, batch_size=4, keep_predictions=True, count=False)
    assert torch.equal(a.predictions, b.predictions)


def test_ctrl_c_stops_and_reports_what_was_done(tmp_path, const_ckpt):
    loaded = load_model(CKPT_MODEL, weights=const_ckpt, img_size=32)
    calls = []

    def progress(n: int) -> None:
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt

    result = evaluate(loaded, imagenet_folder(tmp_path / "val"), workers=0, batch_size=4, progress=progress, count=False)
    assert result.interrupted and result.images == 8 and result.files == 20
    assert result.row()["interrupted"] is True


def test_model_only_timing_leaves_out_warmup_and_partial_batches():
    assert _model_only([(8, 5.0), (8, 1.0), (8, 1.0), (3, 9.0)], 8) == (8.0, 16, 2.0)
    assert _model_only([(8, 5.0), (3, 1.0)], 8) == (3.0, 3, 1.0)  # no full batch after the warm-up
    assert _model_only([(3, 0.5)], 8) == (6.0, 3, 0.5)  # one batch is all there is
    assert _model_only([], 8) == (None, 0, 0)
