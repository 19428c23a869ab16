"""`tpool visualize`: the source maps it draws, the pixels of a panel, the files the command writes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import tiny_vit
from tpool_cli.cli import main
from tpool_cli.ops import make_operator, operator_names
from tpool_cli.patch import is_patched, patch, unpatch
from tpool_cli.data import load_images
from tpool_cli.visualize import (
    boundary_segments, colour_partition, singleton_patches, trace_reductions, visualize,
)

OPS = operator_names()
REDUCING = [op for op in OPS if op != "none"]
FOOLBOX = importlib.util.find_spec("foolbox")


def _reductions(model, images, op, keep, layers, seed=0):
    """Forward with track=True; per reduction (source map, sizes right after it, tokens out)."""
    patch(model, op, keep=keep, layers=layers, track=True, seed=seed)
    seen = []
    hooks = [
        blk.reducer.register_forward_hook(lambda mod, args, out: seen.append(mod.state.sizes.clone()))
        for blk in model.blocks
    ]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    state = model.tpool_state
    unpatch(model)
    return state, list(zip(state.history, seen))


@pytest.fixture(scope="module")
def model():
    return tiny_vit()


# ----------------------------------------------------------------------------- the source map


@pytest.mark.parametrize("op", REDUCING)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    keep=st.floats(0.15, 0.95),
    layers=st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True).map(lambda xs: tuple(sorted(xs))),
    seed=st.integers(0, 3),
)
def test_source_map_is_a_partition_that_agrees_with_sizes(op, keep, layers, seed, model):
    torch.manual_seed(seed)
    images = torch.randn(2, 3, 32, 32)
    state, steps = _reductions(model, images, op, keep, layers, seed)
    reducing = [i for i in sorted(state.counts) if state.counts[i][1] < state.counts[i][0]]
    assert len(steps) == len(reducing), "one source map per reduction that happened"
    merges = make_operator(op).merges
    previous = None
    for (source, sizes), layer in zip(steps, reducing):
        k = state.counts[layer][1]
        assert source.shape == (2, 64) and source.dtype == torch.long
        # every original patch belongs to exactly one current token, or is marked pruned (-1)
        assert torch.all((source >= -1) & (source < k))
        assert sizes.shape == (2, k)
        for b in range(2):
            kept = source[b][source[b] >= 0]
            assert torch.equal(torch.bincount(kept, minlength=k).float(), sizes[b].float()), "bincount of the map == sizes"
        if merges:
            assert torch.all(source >= 0) and torch.all(sizes.sum(1) == 64)
        if previous is not None:
            # reductions only merge or prune: pruned stays pruned, and patches together stay together
            assert torch.all(source[previous < 0] < 0)
            same_before = previous[:, :, None] == previous[:, None, :]
            same_now = source[:, :, None] == source[:, None, :]
            assert torch.all(same_now[same_before])
        previous = source
    if steps:
        final = steps[-1][0]
        for b in range(2):
            counted = torch.bincount(final[b][final[b] >= 0], minlength=state.sizes.shape[1]).float()
            assert torch.equal(counted, state.sizes[b].float())


@pytest.mark.parametrize("op", REDUCING)
def test_trace_is_the_patch_history(op, model, images):
    with torch.no_grad():
        before = model(images)
    traces = trace_reductions(model, images, op, keep=0.5, layers=(1, 2))
    assert not is_patched(model), "tracing leaves the model unpatched"
    with torch.no_grad():
        assert torch.equal(model(images), before)
    state, steps = _reductions(model, images, op, 0.5, (1, 2))
    assert len(traces) == 3
    for b, trace in enumerate(traces):
        assert trace.grid == (8, 8) and trace.patch_size == (4, 4)
        assert [s.layer for s in trace.steps] == [1, 2]
        assert [(s.tokens_in, s.tokens_out) for s in trace.steps] == [state.counts[1], state.counts[2]]
        for step, (source, _) in zip(trace.steps, steps):
            assert torch.equal(step.source, source[b])
            assert np.isfinite(step.recon) and step.recon >= 0 and step.recon_weighted >= 0


def test_no_reduction_gives_no_steps(model, images):
    assert all(t.steps == () for t in trace_reductions(model, images, "none", keep=0.5))
    assert all(t.steps == () for t in trace_reductions(model, images, "topk", keep=1.0))


# ----------------------------------------------------------------------------- pixels


def _image(h=8, w=8, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 3))


def test_colours_groups_singletons_and_pruned_patches():
    img = _image()  # a 2 x 2 grid of 4 x 4 patches
    source = torch.tensor([0, 0, -1, 1])  # patches 0 and 1 merged, patch 2 pruned, patch 3 alone
    out = colour_partition(img, source, (2, 2), (4, 4), "mean")
    assert out.shape == (8, 8, 3)
    group_mean = img[0:4, 0:8].reshape(-1, 3).mean(0)
    assert np.allclose(out[0:4, 0:8], group_mean), "a merged group is filled with the mean colour of its patches"
    assert np.allclose(out[4:8, 4:8], img[4:8, 4:8]), "a singleton keeps its own pixels"
    pruned = out[4:8, 0:4]
    assert np.allclose(pruned[..., 0], pruned[..., 1]) and np.allclose(pruned[..., 1], pruned[..., 2]), "pruned is grey"


def test_palette_is_stable_and_keyed_by_the_group_not_the_token_index():
    img = np.full((8, 8, 3), 0.5)
    a = colour_partition(img, torch.tensor([0, 0, 1, 1]), (2, 2), (4, 4), "palette")
    b = colour_partition(img, torch.tensor([1, 1, 0, 0]), (2, 2), (4, 4), "palette")  # same groups, tokens renumbered
    assert np.allclose(a, b)
    assert not np.allclose(a[0, 0], a[7, 0]), "two groups, two colours"
    assert np.allclose(a[0:4].reshape(-1, 3), a[0, 0])


def test_image_is_cropped_to_the_patch_grid():
    out = colour_partition(_image(10, 9), torch.tensor([0, 0, 0, 0]), (2, 2), (4, 4))
    assert out.shape == (8, 8, 3)


def test_boundaries_between_different_tokens_only():
    labels = np.array([[0, 0, -1], [1, -1, -1]])
    segs = boundary_segments(labels, (4, 4))
    # vertical: (0,1)|(0,2), (1,0)|(1,1); horizontal: (0,0)/(1,0), (0,1)/(1,1); none inside the pruned area
    assert sorted(segs) == sorted([((8, 0), (8, 4)), ((4, 4), (4, 8)), ((0, 4), (4, 4)), ((4, 4), (8, 4))])
    assert singleton_patches(labels) == [(1, 0)]


# ----------------------------------------------------------------------------- figures


def _is_png(path: Path) -> bool:
    with Image.open(path) as img:
        img.verify()
        return img.format == "PNG"


def test_library_writes_a_figure_per_image_and_operator(model, images, tmp_path):
    written = visualize(model, images[:2], ["a.png", "b.jpg"], OPS, tmp_path, keep=0.5, layers=(1, 2))
    assert [p.name for p in written] == [f"{stem}_{op}.png" for stem in "ab" for op in OPS]
    assert all(p.stat().st_size > 1000 and _is_png(p) for p in written)


def test_library_grid_svg_and_compact(model, images, tmp_path):
    written = visualize(model, images[:1], ["x.png"], REDUCING, tmp_path, keep=0.5, grid=True, fmt="svg")
    assert [p.name for p in written] == ["x_compare.svg"]
    assert written[0].read_text().lstrip().startswith("<?xml")
    (small,) = visualize(model, images[:1], ["x.png"], REDUCING, tmp_path, keep=0.5, grid=True, compact=True)
    with Image.open(small) as img:
        assert img.mode == "P"


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Two generated images (a seeded smooth field plus noise), PNG and JPEG, of odd sizes."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w, suffix) in enumerate([(90, 120, ".png"), (150, 100, ".jpg")]):
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        field = np.stack([np.sin(6 * xx + i), np.cos(5 * yy), np.sin(4 * (xx + yy))], -1) * 0.4 + 0.5
        pixels = np.clip(field + rng.normal(0, 0.05, field.shape), 0, 1)
        path = folder / f"generated_{i}{suffix}"
        Image.fromarray((pixels * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


TINY_CLI = ["--model", "deit_tiny_patch16_224", "--random-init", "--img-size", "64"]


def _run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_command_writes_pngs_for_several_operators(photos, tmp_path, capsys):
    code, out, err = _run(["visualize", *map(str, photos), *TINY_CLI, "--ops", "topk,random,grid", "--keep", "0.5", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    printed = [Path(line) for line in out.splitlines()]
    assert [p.name for p in printed] == [f"generated_{i}_{op}.png" for i in range(2) for op in ("topk", "random", "grid")]
    assert all(p.is_file() and p.stat().st_size > 1000 and _is_png(p) for p in printed)


def test_command_grid_all_operators_is_reproducible(photos, tmp_path, capsys):
    figures = []
    for run in ("first", "second"):
        argv = ["visualize", str(photos[1]), *TINY_CLI, "--grid", "--layers", "2,5", "--out", str(tmp_path / run)]
        code, out, err = _run(argv, capsys)
        assert code == 0, err
        (path,) = [Path(line) for line in out.splitlines()]
        assert path.name == "generated_1_compare.png" and _is_png(path) and path.stat().st_size > 1000
        figures.append(path.read_bytes())
    assert figures[0] == figures[1], "--random-init weights are seeded (--seed), so the same command draws the same figure"


@pytest.mark.skipif(FOOLBOX is None, reason="foolbox (which ships sample ImageNet photos) is not installed")
def test_command_on_a_real_photo(tmp_path, capsys):
    photo = Path(FOOLBOX.origin).parent / "data" / "imagenet_00_243.jpg"
    code, out, err = _run(
        ["visualize", str(photo), "--model", "deit_tiny_patch16_224", "--random-init", "--ops", "topk,grid",
         "--grid", "--svg", "--out", str(tmp_path)],
        capsys,
    )
    assert code == 0, err
    (path,) = [Path(line) for line in out.splitlines()]
    assert path.suffix == ".svg" and path.stat().st_size > 10_000


def _not_an_image(tmp_path: Path) -> Path:
    path = tmp_path / "notes.png"
    path.write_text("not an image\n")
    return path


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tmp: [str(tmp / "missing.jpg")], "image not found"),
        (lambda tmp: [str(_not_an_image(tmp))], "not an image file"),
        (lambda tmp: [str(tmp)], "not an image file"),
        (lambda tmp: [], "give one or more IMAGE files"),
        (lambda tmp: [str(tmp / "x.jpg"), "--keep", "0.5,0.7"], "one --keep rate"),
        (lambda tmp: [str(tmp / "x.jpg"), "--ops", "nope"], "unknown operator"),
        (lambda tmp: [str(tmp / "x.jpg"), "--colors", "rainbow"], "--colors must be one of"),
    ],
)
def test_bad_input_is_one_line_exit_2(make_args, message, tmp_path, capsys):
    code, out, err = _run(["visualize", *make_args(tmp_path), *TINY_CLI, "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert out == ""


def test_missing_image_in_a_real_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "tpool_cli", "visualize", str(tmp_path / "nope.jpg"), *TINY_CLI],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: image not found: {tmp_path / 'nope.jpg'}"


def test_greyscale_images_load_as_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.zeros((5, 7), dtype=np.uint8), mode="L").save(path)
    batch, _ = load_images([path], tiny_vit())
    assert batch.shape == (1, 3, 32, 32)
