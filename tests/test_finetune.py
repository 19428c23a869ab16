"""`tpool finetune`: training lowers the loss, checkpoints reload exactly, resume equals an uninterrupted run,
gradients flow through every operator, bad input is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tpool_cli.data import scan_folder
from tpool_cli.demo import DEMO_MODEL, ensure_demo_data
from tpool_cli.errors import TpoolError
from tpool_cli.finetune import (
    FinetuneCallbacks, FinetuneSettings, distillation_loss, finetune, timm_state_dict,
)
from tpool_cli.models import load_model
from tpool_cli.ops import operator_names
from tpool_cli.patch import patch

from conftest import tiny_vit

QUICK = dict(batch_size=16, lr=5e-4, warmup_epochs=0.0, crop_scale=1.0, hflip=0.0, seed=3)


@pytest.fixture(scope="module")
def demo_train():
    return scan_folder(ensure_demo_data(split="train").root, class_map=ensure_demo_data(split="train").class_map, limit=None)


def _subset(folder, n: int):
    """Every k-th training digit, so a small subset still holds all ten classes."""
    from dataclasses import replace

    step = max(1, len(folder) // n)
    return replace(folder, samples=folder.samples[::step][:n])


def _demo_model(op: str = "kmeans", keep: float = 0.3):
    loaded = load_model(DEMO_MODEL)
    patch(loaded.model, op, keep=keep)
    return loaded


def test_distillation_loss_is_zero_when_student_equals_teacher():
    logits = torch.randn(4, 10)
    assert distillation_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert distillation_loss(logits, logits.flip(1), temperature=2.0).item() > 0.01


def test_settings_reject_bad_values():
    with pytest.raises(TpoolError, match="--lr"):
        FinetuneSettings(lr=0.0)
    with pytest.raises(TpoolError, match="crop-scale"):
        FinetuneSettings(crop_scale=1.5)


def _train_loss(model, folder) -> float:
    """Cross-entropy of the model on the folder without augmentation (eval transform), eval mode."""
    from tpool_cli.data import Decoder, data_config, normalize

    cfg = data_config(model)
    decode = Decoder(cfg)
    x = normalize(torch.stack([decode(s.path) for s in folder.samples]), cfg["mean"], cfg["std"])
    y = torch.tensor([s.label for s in folder.samples])
    model.eval()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


def test_fine_tuning_lowers_the_training_loss_and_writes_its_files(tmp_path, demo_train):
    train = _subset(demo_train, 48)
    loaded = _demo_model("kmeans", 0.3)
    before = _train_loss(loaded.model, train)
    settings = FinetuneSettings(epochs=2, distill=False, label_smoothing=0.0, **QUICK)
    result = finetune(loaded, train, None, tmp_path, settings, device=torch.device("cpu"))
    after = _train_loss(loaded.model, train)
    assert after < before
    assert [e["epoch"] for e in result.state.log] == [1, 2] and result.state.updates == 6
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log == result.state.log
    record = json.loads((tmp_path / "model.json").read_text())
    assert record["op"] == "kmeans" and record["schedule"].startswith("keep=0.3") and record["epochs_done"] == 2


def test_checkpoint_reloads_bit_identically_through_weights(tmp_path, demo_train):
    loaded = _demo_model("tome", 0.5)
    settings = FinetuneSettings(epochs=1, max_steps=1, **QUICK)
    result = finetune(loaded, _subset(demo_train, 16), None, tmp_path, settings, device=torch.device("cpu"))
    reloaded = load_model(DEMO_MODEL, weights=result.model_path)
    want = timm_state_dict(loaded.model)
    got = reloaded.model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    from safetensors import safe_open

    with safe_open(str(result.model_path), "pt") as fh:
        meta = json.loads(fh.metadata()["tpool"])
    assert meta["op"] == "tome" and meta["schedule"].startswith("keep=0.5")


def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path, demo_train):
    train = _subset(demo_train, 32)
    settings = FinetuneSettings(epochs=2, **QUICK)
    whole = _demo_model("wkmeans", 0.5)
    finetune(whole, train, None, tmp_path / "whole", settings, device=torch.device("cpu"))

    def kill_after_first(entry):
        if entry["epoch"] == 1:
            raise KeyboardInterrupt

    parted = _demo_model("wkmeans", 0.5)
    with pytest.raises(KeyboardInterrupt):
        finetune(parted, train, None, tmp_path / "parted", settings, device=torch.device("cpu"),
                 callbacks=FinetuneCallbacks(epoch_end=kill_after_first))
    assert (tmp_path / "parted" / "last.pt").is_file() and not (tmp_path / "parted" / "model.safetensors").exists()
    fresh = _demo_model("wkmeans", 0.5)  # a new process would start from the shipped weights again
    result = finetune(fresh, train, None, tmp_path / "parted", settings, device=torch.device("cpu"))
    assert result.resumed_epochs == 1
    a, b = timm_state_dict(whole.model), timm_state_dict(fresh.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    whole_log = [json.loads(line) for line in (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()]
    assert [e["loss"] for e in result.state.log] == [e["loss"] for e in whole_log]


TRAINABLE = [name for name in operator_names() if name not in ("none", "drop")]


@pytest.mark.parametrize("op", TRAINABLE)
def test_gradients_reach_the_blocks_below_a_reduction(op):
    model = tiny_vit(depth=3)
    patch(model, op, keep=0.5, layers=(1,))
    model.train()
    seen = {}

    def keep_grad(module, args):
        args[0].register_hook(lambda g: seen.setdefault("grad", g))

    model.blocks[1].reducer.register_forward_pre_hook(keep_grad)
    x = torch.randn(2, 3, 32, 32)
    model(x).logsumexp(dim=1).sum().backward()
    grads = [p.grad for p in model.blocks[0].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    patch_grads = seen["grad"][:, model.num_prefix_tokens :]
    assert torch.isfinite(patch_grads).all() and patch_grads.abs().sum(dim=-1).gt(0).any()
    # gradients reach patch tokens through the operator's output, not only through the class token:
    # the MLP after the reduction runs on the reduced tokens only, so its weights see them
    assert model.blocks[1].block.mlp.fc1.weight.grad.abs().sum() > 0


def _tpool(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tpool_cli", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_demo_fine_tune_runs_from_the_command_line(tmp_path):
    proc = _tpool("finetune", "--op", "kmeans", "--keep", "0.3", "--epochs", "1", "--max-steps", "3", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "built-in demo" in proc.stderr and "top-1" in proc.stdout
    row = json.loads((tmp_path / "results.jsonl").read_text())
    assert row["op"] == "kmeans" and row["images"] == 360 and row["finetune"]["updates"] == 3
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob(".*tmp*"))


def _class_folder(root: Path, classes: list[str]) -> Path:
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        Image.new("L", (8, 8), 128).save(root / c / "a.png")
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in ["0", "1", "2"]))
    return root


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--keep", "1.0"], "reduces no token"),
        (["--op", "none"], "nothing to fine-tune"),
        (["--keep", "1.5"], "keep rate"),
        (["--op", "nope"], "unknown operator"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, extra, message):
    code, err = _main(["finetune", "--op", "kmeans", "--out", str(tmp_path / "o"), "--max-steps", "1", *extra], capsys)
    assert code != 0 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 or "built-in demo" in err.splitlines()[0]


def _main(argv: list[str], capsys) -> tuple[int, str]:
    """The CLI in this process (as test_cli does): exit code and stderr."""
    from tpool_cli.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


def test_bad_folders_are_one_line(tmp_path, capsys):
    train = _class_folder(tmp_path / "train", ["0", "1"])
    val = _class_folder(tmp_path / "val", ["0", "2"])
    common = ["finetune", "--model", DEMO_MODEL, "--class-map", str(train / "classes.txt"), "--max-steps", "1"]
    code, err = _main([*common, "--data", str(train), "--val", str(val), "--out", str(tmp_path / "o")], capsys)
    assert code != 0 and "class(es) the train folder lacks" in err and "Traceback" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _main([*common, "--data", str(empty), "--out", str(tmp_path / "o")], capsys)
    assert code != 0 and "Traceback" not in err and err.strip()
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = _main([*common, "--data", str(train), "--out", str(blocker / "sub")], capsys)
    assert code != 0 and "cannot write to --out" in err
    code, err = _main([*common, "--data", str(train), "--weights", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")], capsys)
    assert code != 0 and "weights file not found" in err
