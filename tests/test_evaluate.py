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


# --- A model that ranks the true class second, sixth...: top-1 and top-5 differ by a known amount ---

RANKING = [7, 3, 9, 1, 5, 0, 2, 4, 6, 8]  # the fixed order of the 10 classes, best first


def _ranked_model() -> torch.nn.Module:
    """A tiny 10-class ViT whose logits rank the classes as RANKING whatever the image (head zeroed,
    one bias per rank), so an image of class RANKING[r] is a top-1 hit for r = 0, a top-5 hit for r <= 4."""
    from conftest import tiny_vit

    model = tiny_vit()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([float(10 - RANKING.index(c)) for c in range(10)]))
    return model


def _class_folder(root, counts: dict[int, int]):
    """An image folder with ``counts[c]`` noise images of class c (folders 0..9, a class map)."""
    from imagefolders import noise_images

    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    for c, n in counts.items():
        noise_images(root / str(c), n, size=32, seed=c)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in range(10)))
    return root


def test_top1_and_top5_count_exactly_the_ranks(tmp_path):
    """Ranks 1, 2, 5 and 6 on purpose: counting a top-5 hit as top-1 (or a top-6 hit as top-5) fails here."""
    counts = {RANKING[0]: 2, RANKING[1]: 3, RANKING[4]: 1, RANKING[5]: 4}  # 10 images: 2 top-1, 6 top-5
    folder = _class_folder(tmp_path / "val", counts)
    model = _ranked_model()
    patch(model, "topk", keep=0.5, layers=(1,))  # a reducing path: the ranking comes from the head alone
    result = evaluate(model, folder, class_map=folder / "classes.txt", workers=0, batch_size=3, count=False)
    assert (result.images, result.correct1, result.correct5) == (10, 2, 6)
    assert (result.top1, result.top5) == (20.0, 60.0)


def test_bf16_matches_fp32_within_tolerance(tmp_path):
    """bf16 autocast (8 mantissa bits: ~0.4% per rounding) against fp32, on a patched model's logits.

    Stated tolerance: every logit within 5% of the fp32 logits' spread (max - min) per image, and
    the evaluated top-1 classes agree on at least 15 of 16 images."""
    from conftest import tiny_vit

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=gen)
    model = tiny_vit()
    patch(model, "kmeans", keep=0.5, layers=(1,))
    with torch.no_grad():
        fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x).float()
    spread = (fp32.max(dim=1).values - fp32.min(dim=1).values)[:, None]
    assert bool(((bf16 - fp32).abs() <= 0.05 * spread).all()), (bf16 - fp32).abs().max()
    assert not torch.equal(bf16, fp32)  # the autocast really ran in bf16
    agree = (bf16.argmax(1) == fp32.argmax(1)).sum().item()
    assert agree >= 15


def test_compiled_evaluation_of_random_gives_the_eager_predictions(tmp_path, monkeypatch):
    """`evaluate(compile=True)` with the `random` operator: the same predictions as eager, image by image
    (the partial last batch padded to one shape). aot_eager backend: dynamo's capture without codegen."""
    import functools

    folder = _class_folder(tmp_path / "val", {c: 1 for c in range(10)})
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    results = []
    for compiled in (False, True):
        from conftest import tiny_vit

        model = tiny_vit()
        patch(model, "random", keep=0.5, layers=(1,), seed=3)
        results.append(evaluate(model, folder, class_map=folder / "classes.txt", workers=0, batch_size=4,
                                count=False, compile=compiled, keep_predictions=True))
    torch._dynamo.reset()
    eager, compiled_result = results
    assert compiled_result.compile_seconds is not None and eager.compile_seconds is None
    assert torch.equal(compiled_result.predictions, eager.predictions)
    assert (compiled_result.correct1, compiled_result.correct5) == (eager.correct1, eager.correct5)
