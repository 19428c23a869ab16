"""Reconstruction error: clustering minimises it; `tpool recon` reports it per layer."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import tiny_vit
from tpool_cli.cli import main
from tpool_cli.data import images_in_folder, load_images
from tpool_cli.diagnose import reconstruction_rows
from tpool_cli.errors import TpoolError
from tpool_cli.ops import make_operator
from tpool_cli.ops.base import ReduceContext
from tpool_cli.patch import is_patched
from tpool_cli.recon import reconstruction_error
from tpool_cli.schedule import Schedule

CLUSTERING = ["kmeans", "kmedoids", "wkmeans", "wkmedoids"]
BASELINES = [("topk", {}), ("topk", {"score": "received"}), ("random", {}), ("grid", {})]


def structured_tokens(seed, b=8, rows=8, cols=8, c=16, regions=6, noise=0.3):
    """Tokens of 'images' made of a few regions (random Voronoi cells of the grid, not grid-aligned),
    each a prototype vector plus noise; keys are a linear map of the tokens; attention is random."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(rows).float(), torch.arange(cols).float(), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1)
    centers = torch.rand(b, regions, 2, generator=g) * torch.tensor([rows, cols])
    label = torch.cdist(pos.expand(b, -1, -1), centers).argmin(-1)
    protos = 2 * torch.randn(b, regions, c, generator=g)
    x = torch.gather(protos, 1, label.unsqueeze(-1).expand(-1, -1, c)) + noise * torch.randn(b, rows * cols, c, generator=g)
    ctx = ReduceContext(
        sizes=torch.ones(b, rows * cols),
        significance=torch.rand(b, rows * cols, generator=g) + 0.5,
        cls_attn=torch.rand(b, rows * cols, generator=g).softmax(1),
        keys=x @ torch.randn(c, 8, generator=g),
        grid=(rows, cols),
        seed=0,
    )
    return x, ctx


def errors(x, ctx, k, name, **options):
    """(unweighted, significance-weighted) reconstruction error, mean over the batch."""
    out = make_operator(name, **options)(x, k, ctx)
    assert out.tokens.shape[1] == k, f"{name} realised {out.tokens.shape[1]} tokens, not {k}"
    return (
        reconstruction_error(x, out.tokens, ctx.sizes).mean().item(),
        reconstruction_error(x, out.tokens, ctx.sizes, ctx.significance).mean().item(),
    )


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", CLUSTERING)
def test_clustering_reconstructs_better_than_pruning_and_grid(seed, name):
    """The quantity Token Pooling minimises is lower than top-K, random and grid leave, at the same K
    (16 of 64: a 4 x 4 grid, so grid pooling realises exactly K). Farthest-point init: see the next test
    and docs/operators.md for the significance init."""
    x, ctx = structured_tokens(seed)
    which = 1 if name.startswith("w") else 0  # weighted variants minimise the weighted error
    ours = errors(x, ctx, 16, name, init="farthest")[which]
    for baseline, options in BASELINES:
        theirs = errors(x, ctx, 16, baseline, **options)[which]
        assert ours < 0.8 * theirs, f"{name}: {ours:.3f} vs {baseline}{options}: {theirs:.3f}"


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", CLUSTERING)
def test_significance_init_only_improves_on_its_seeds(seed, name):
    """From the K most significant tokens the objective can only fall: never worse than keeping those
    tokens (top-K by received attention), which is where the iterations start."""
    x, ctx = structured_tokens(seed)
    which = 1 if name.startswith("w") else 0
    ours = errors(x, ctx, 16, name)[which]
    seeds = errors(x, ctx, 16, "topk", score="received")[which]
    assert ours < seeds


def smooth_region_images(seed, b=4, size=32, regions=7):
    """Images of a few flat-coloured regions (random Voronoi cells, not aligned to patches) plus noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    pixels = torch.stack([yy.flatten(), xx.flatten()], 1)
    label = torch.cdist(pixels.expand(b, -1, -1), torch.rand(b, regions, 2, generator=g) * size).argmin(-1)
    colours = torch.randn(b, regions, 3, generator=g)
    image = torch.gather(colours, 1, label.unsqueeze(-1).expand(-1, -1, 3)).transpose(1, 2).reshape(b, 3, size, size)
    return image + 0.1 * torch.randn(b, 3, size, size, generator=g)


def test_rows_per_layer_and_clustering_wins_in_a_model():
    model = tiny_vit()
    images = smooth_region_images(0)
    schedule = Schedule(keep=0.25, layers=(1, 2))
    configs = [(make_operator(name, init="farthest"), schedule) for name in CLUSTERING]
    configs += [(make_operator(name, **options), schedule) for name, options in BASELINES]
    rows = reconstruction_rows(model, images, configs, batch_size=3)
    assert not is_patched(model)
    assert len(rows) == 2 * len(configs)
    assert {(r["layer"], r["tokens_in"], r["tokens_out"]) for r in rows} == {(1, 64, 16), (2, 16, 4)}
    assert all(r["images"] == 4 and r["recon"] >= 0 and r["recon_weighted"] >= 0 for r in rows)
    # at the first reducing layer every operator sees the same tokens: a direct comparison
    first = {r["op"]: r for r in rows if r["layer"] == 1}
    for name in CLUSTERING:
        key = "recon_weighted" if name.startswith("w") else "recon"
        ours = first[f"{name}(init=farthest)"][key]
        for baseline in ("topk", "topk(score=received)", "random", "grid"):
            assert ours < first[baseline][key], (name, baseline)


def test_rows_do_not_depend_on_the_batch_size():
    model = tiny_vit()
    images = smooth_region_images(1, b=3)
    configs = [(make_operator("kmeans"), Schedule(keep=0.5, layers=(1,)))]
    one = reconstruction_rows(model, images, configs, batch_size=1)
    three = reconstruction_rows(model, images, configs, batch_size=3)
    assert one[0]["recon"] == pytest.approx(three[0]["recon"], rel=1e-5)


def test_bad_image_batches_are_tpool_errors():
    with pytest.raises(TpoolError, match="non-empty batch"):
        reconstruction_rows(tiny_vit(), torch.zeros(0, 3, 32, 32), [])


# ---------------------------------------------------------------- image folder and CLI


def write_images(root, count=3):
    """Red channel 0, 40, 80 for c.png, b/img1.png, a/deep/img0.jpg (sorted order: the reverse)."""
    paths = [root / "c.png", root / "b" / "img1.png", root / "a" / "deep" / "img0.jpg"][:count]
    for i, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + 8 * i, 48), color=(40 * i, 100, 200)).save(path, quality=100)
    (root / "notes.txt").write_text("not an image")
    return paths


def test_image_folder_sorted_any_depth_and_limited(tmp_path):
    write_images(tmp_path)
    model = tiny_vit()
    images, _ = load_images(images_in_folder(tmp_path, limit=2), model)
    assert images.shape == (2, 3, 32, 32)
    # sorted relative paths: a/deep/img0.jpg (red 80), then b/img1.png (red 40); c.png is past the limit
    assert images[0, 0].mean() > images[1, 0].mean()


def test_image_folder_errors(tmp_path):
    model = tiny_vit()
    with pytest.raises(TpoolError, match="not found"):
        images_in_folder(tmp_path / "missing", 4)
    with pytest.raises(TpoolError, match="no image files"):
        images_in_folder(tmp_path, 4)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(TpoolError, match="not an image file"):
        load_images(images_in_folder(tmp_path, 4), model)


def test_cli_without_data_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["recon", "--model", "vit_tiny_patch16_224", "--random-init"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data" in err[0]


def test_cli_json_on_an_image_folder(tmp_path):
    write_images(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "tpool_cli", "recon", "--model", "vit_tiny_patch16_224", "--random-init", "--data", str(tmp_path),
         "--limit", "2", "--op", "kmeans,topk", "--keep", "0.7", "--layers", "2,5", "--device", "cpu", "-f", "json"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    rows = payload["results"]
    assert payload["images"] == 2
    assert [(r["op"], r["layer"], r["tokens_in"], r["tokens_out"]) for r in rows] == [
        ("kmeans", 2, 196, 137), ("kmeans", 5, 137, 96), ("topk", 2, 196, 137), ("topk", 5, 137, 96)
    ]
    assert all(r["recon"] > 0 for r in rows)
