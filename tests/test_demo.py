"""The built-in demo: shipped weights and record, the test split as an image folder, operators on the demo model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from tpool_cli import demo
from tpool_cli.demo import DEMO_MODEL, demo_images, ensure_demo_data
from tpool_cli.errors import TpoolError
from tpool_cli.flops import count_flops
from tpool_cli.models import load_model
from tpool_cli.patch import patch

RECORD = demo.shipped_record()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh, empty cache directory for this test."""
    monkeypatch.setenv("TPOOL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The demo folder written once for the tests that only read it."""
    return ensure_demo_data(tmp_path_factory.mktemp("demo-cache"))


@pytest.fixture(scope="module")
def model():
    return load_model(DEMO_MODEL).model


def _transform(model):
    return create_transform(**resolve_data_config({}, model=model))


def _read_folder(data, transform):
    """The plain image-folder path: class map -> folders -> PNG -> RGB -> timm transform, in split order."""
    classes = data.class_map.read_text().split()
    items = [(int(p.stem), index, p) for index, name in enumerate(classes) for p in (data.root / name).glob("*.png")]
    items.sort()  # file names are positions in the split: the order the training script evaluated in
    x = torch.stack([transform(Image.open(p).convert("RGB")) for _, _, p in items])
    return x, torch.tensor([label for _, label, _ in items])


def _files(root):
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_registered_with_timm_and_its_preprocessing(model):
    assert timm.is_model(DEMO_MODEL)
    assert model.patch_embed.num_patches == 64 and model.patch_embed.grid_size == (8, 8)
    assert model.num_prefix_tokens == 1 and model.num_classes == 10
    config = resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 32, 32) and config["crop_pct"] == 1.0
    assert config["interpolation"] == "bilinear"
    assert config["mean"] == demo.DIGITS_MEAN and config["std"] == demo.DIGITS_STD


def test_shipped_weights_load_without_weights_option():
    loaded = load_model(DEMO_MODEL)
    assert loaded.weights == str(demo.shipped_weights()) and loaded.pretrained
    assert loaded.weights_sha256 == RECORD["weights_sha256"]
    assert demo.shipped_weights().stat().st_size < 5e6
    plain = timm.create_model(DEMO_MODEL, pretrained=True)  # timm alone finds them too, offline
    for (name, a), b in zip(loaded.model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name


def test_folder_layout_and_class_map(data):
    assert data.root.name == "digits-test" and data.class_map == data.root / "classes.txt"
    assert data.class_map.read_text() == "".join(f"{c}\n" for c in range(10))
    assert sorted(p.name for p in data.root.iterdir() if p.is_dir()) == [str(c) for c in range(10)]
    images, labels = demo.load_test_split()
    assert data.num_images == len(images) == RECORD["test_total"] == 360
    for c in range(10):
        assert len(list((data.root / str(c)).glob("*.png"))) == int((labels == c).sum())
    for i in (0, 123, 359):
        png = Image.open(data.root / str(int(labels[i])) / f"{i:03d}.png")
        assert png.mode == "L" and png.size == (8, 8)
        assert np.array_equal(np.asarray(png), images[i])  # lossless: the raw digit, 0..255


def test_folder_gives_exactly_the_training_inputs(data, model):
    transform = _transform(model)
    x, y = _read_folder(data, transform)
    images, labels = demo.load_test_split()
    assert torch.equal(x, demo.digits_to_tensors(images, transform))  # what train_demo.py evaluated
    assert torch.equal(y, torch.from_numpy(labels))
    assert x.shape == (360, 3, 32, 32) and x.dtype == torch.float32


@torch.no_grad()
def test_recorded_test_accuracy_exactly(data, model):
    x, y = _read_folder(data, _transform(model))
    batch = RECORD["eval_batch_size"]
    logits = torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
    correct = int((logits.argmax(1) == y).sum())
    assert correct == RECORD["test_correct"]
    assert 100 * correct / len(y) == pytest.approx(RECORD["test_top1"], abs=1e-4)
    assert RECORD["test_top1"] >= 90.0


def test_tpool_evaluate_reproduces_the_recorded_accuracy(data):
    """The demo flows through exactly the evaluate path a user's ImageNet folder takes."""
    from tpool_cli.evaluate import evaluate

    result = evaluate(load_model(DEMO_MODEL), data.root, class_map=data.class_map, device="cpu", batch_size=64, workers=0, count=False)
    assert (result.images, result.correct1) == (360, RECORD["test_correct"])
    assert result.top1 == pytest.approx(RECORD["test_top1"], abs=1e-4)


def test_demo_sweep_end_to_end(tmp_path):
    """`tpool pareto` with no --model/--data runs the built-in demo and writes every output."""
    import json
    import subprocess
    import sys

    out = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TPOOL_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "tpool_cli", "pareto", "--limit", "40", "--keep", "1.0,0.5", "--ops", "kmeans,topk,tome", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "built-in demo" in proc.stderr and "--data" in proc.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["op"], r["keep"]) for r in rows) == [("kmeans", 0.5), ("none", 1.0), ("tome", 0.5), ("topk", 0.5)]
    assert all(r["model"] == DEMO_MODEL and r["images"] == 40 for r in rows)
    for name in ("results.csv", "pareto.md", "top1_vs_gmacs.png", "top1_vs_gmacs.svg", "top1_vs_speed.png", "top1_vs_speed.svg"):
        assert (out / name).stat().st_size > 0, name


def test_ensure_is_idempotent(cache):
    first = ensure_demo_data()
    before = _files(first.root)
    assert ensure_demo_data() == first
    assert _files(first.root) == before  # nothing rewritten
    assert [p.name for p in cache.iterdir()] == ["digits-test"]  # no temporary folders left


def test_interrupted_write_leaves_no_half_folder(cache, monkeypatch):
    real = demo._write_folder

    def dies_halfway(target, images, labels, stamp):
        real(target, images[:100], labels[:100], stamp)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_write_folder", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_data()
    assert not cache.exists() or list(cache.iterdir()) == []
    monkeypatch.setattr(demo, "_write_folder", real)
    assert ensure_demo_data().num_images == 360


def test_damaged_folder_is_replaced(cache):
    data = ensure_demo_data()
    next((data.root / "3").glob("*.png")).unlink()
    ensure_demo_data()
    assert len(list(data.root.glob("*/*.png"))) == 360
    assert [p.name for p in cache.iterdir()] == ["digits-test"]


def test_unwritable_cache_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("TPOOL_CACHE_DIR", str(tmp_path / "file" / "cache"))
    with pytest.raises(TpoolError, match="TPOOL_CACHE_DIR"):
        ensure_demo_data()


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TPOOL_CACHE_DIR", str(tmp_path / "x"))
    assert demo.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("TPOOL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.cache_dir() == tmp_path / "xdg" / "tpool"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert demo.cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "tpool"


def test_demo_images(cache):
    _, labels = demo.load_test_split()
    paths = demo_images(5)
    assert [p.name for p in paths] == [f"{i:03d}.png" for i in range(5)]
    assert [p.parent.name for p in paths] == [str(int(c)) for c in labels[:5]]
    assert all(p.is_file() for p in paths)
    assert len(demo_images(10_000)) == 360 and demo_images(0) == []
    with pytest.raises(TpoolError):
        demo_images(-1)


@pytest.mark.parametrize("op", ["topk", "random", "grid"])
@torch.no_grad()
def test_operators_on_the_demo_model(op, data):
    model = load_model(DEMO_MODEL).model
    x, _ = _read_folder(data, _transform(model))
    x = x[:16]
    reference, full = model(x), count_flops(model).total
    patch(model, op, keep=1.0)
    assert torch.equal(model(x), reference)
    patch(model, op, keep=0.5)
    out = model(x)
    assert out.shape == (16, 10) and torch.isfinite(out).all()
    assert [n_in for n_in, _ in model.tpool_state.counts.values()][-1] < 64
    assert count_flops(model).total < full
