"""Image folders: wnid -> class index, class maps, unreadable files, preprocessing, decode once."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image
from timm.data import create_transform

from imagefolders import foolbox_images, imagenet_folder, noise_images, photos_as, synsets
from tpool_cli.data import (
    Decoder, decode_once, fingerprint, folder_loader, normalize, read_class_map, scan_folder,
)
from tpool_cli.demo import DEMO_MODEL
from tpool_cli.models import resolve_workload
from tpool_cli.errors import TpoolError

CFG = {
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "crop_pct": 0.9,
    "crop_mode": "center",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
}


def test_wnid_folders_map_to_imagenet_indices_not_to_folder_order(tmp_path):
    root = imagenet_folder(tmp_path / "val")
    folder = scan_folder(root)
    truth = {path.name: label for path, label in foolbox_images()}
    assert len(folder) == 20
    assert {s.path.name: s.label for s in folder.samples} == truth
    assert [s.rel for s in folder.samples] == sorted(s.rel for s in folder.samples)
    assert folder.classes[synsets()[609]] == 609  # two photos share class 609: one folder


def test_single_class_folder_keeps_its_imagenet_index(tmp_path):
    root = imagenet_folder(tmp_path / "val", labels={559})
    folder = scan_folder(root)
    assert [s.label for s in folder.samples] == [559]


def test_limit_keeps_the_first_files_in_sorted_order(tmp_path):
    folder = scan_folder(imagenet_folder(tmp_path / "val"), limit=5)
    full = scan_folder(tmp_path / "val")
    assert folder.samples == full.samples[:5] and folder.total_files == 20


def test_class_map_gives_line_numbers_as_indices(tmp_path):
    names = ["zero", "one", "two", "three"]
    (tmp_path / "map.txt").write_text("\n".join(names) + "\n\n")
    for name in ("three", "one"):
        noise_images(tmp_path / "data" / name, 2)
    folder = scan_folder(tmp_path / "data", class_map=tmp_path / "map.txt")
    assert sorted({(s.rel.split("/")[0], s.label) for s in folder.samples}) == [("one", 1), ("three", 3)]
    assert folder.label_space == "class map map.txt"


@pytest.mark.parametrize(
    "text, message",
    [("", "is empty"), ("a\n\nb\n", "line 2 is empty"), ("a\nb\na\n", "appears on lines 1 and 3")],
)
def test_bad_class_maps(tmp_path, text, message):
    (tmp_path / "map.txt").write_text(text)
    with pytest.raises(TpoolError, match=message):
        read_class_map(tmp_path / "map.txt")


def test_folder_errors(tmp_path):
    with pytest.raises(TpoolError, match="data folder not found"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TpoolError, match="no images under"):
        scan_folder(tmp_path / "empty")
    (tmp_path / "empty" / synsets()[0]).mkdir()
    with pytest.raises(TpoolError, match="no images under"):
        scan_folder(tmp_path / "empty")
    noise_images(tmp_path / "loose", 2)
    with pytest.raises(TpoolError, match="found 2 file"):
        scan_folder(tmp_path / "loose")
    with pytest.raises(TpoolError, match="class map not found"):
        scan_folder(tmp_path / "loose", class_map=tmp_path / "nope.txt")
    with pytest.raises(TpoolError, match="--data DIR is required for deit_small"):
        resolve_workload("deit_small_patch16_224", None, None, "evaluate")


def test_demo_is_the_default_workload(tmp_path):
    work = resolve_workload(None, None, None, "evaluate")
    assert work.demo and work.model == DEMO_MODEL and (work.data / "0").is_dir() and work.class_map.name == "classes.txt"
    assert resolve_workload(DEMO_MODEL, None, None, "pareto").demo
    mine = resolve_workload(None, tmp_path, None, "evaluate")
    assert not mine.demo and mine.model == "deit_small_patch16_224" and mine.data == tmp_path


def test_unknown_wnids_are_listed(tmp_path):
    root = photos_as(tmp_path / "val", synsets()[1], 1)
    for name in ("cats", "dogs", "n99999999"):
        photos_as(root, name, 1)
    with pytest.raises(TpoolError) as info:
        scan_folder(root)
    message = str(info.value)
    assert "3 class folder(s)" in message and "cats, dogs, n99999999" in message and "--class-map" in message


def test_unreadable_files_are_reported_not_raised(tmp_path):
    good = noise_images(tmp_path / "c" / "x", 2)
    (tmp_path / "c" / "x" / "truncated.jpg").write_bytes(good[0].read_bytes()[:300])
    (tmp_path / "c" / "x" / "garbage.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "c" / "x" / "notes.txt").write_text("hello")
    (tmp_path / "c" / "x" / ".hidden.jpg").write_bytes(b"ignored")
    (tmp_path / "map.txt").write_text("x\n")
    folder = scan_folder(tmp_path / "c", class_map=tmp_path / "map.txt")
    assert len(folder) == 5  # hidden files are not listed
    batches = list(folder_loader(folder, Decoder(CFG), batch_size=2, workers=0))
    decoded = sum(0 if images is None else images.shape[0] for images, _, _ in batches)
    skipped = {folder.samples[i].rel: reason for _, _, bad in batches for i, reason in bad}
    assert decoded == 2
    assert set(skipped) == {"x/truncated.jpg", "x/garbage.jpg", "x/notes.txt"}
    assert skipped["x/notes.txt"] == "not an image file"
    assert skipped["x/garbage.jpg"] == "cannot identify image file"
    assert skipped["x/truncated.jpg"].startswith("cannot decode")


def test_uint8_half_plus_device_normalisation_equals_timms_full_transform(tmp_path):
    path = foolbox_images()[0][0]
    full = create_transform(**{k: v for k, v in CFG.items()}, is_training=False)
    with Image.open(path) as img:
        expected = full(img.convert("RGB"))
    got = normalize(Decoder(CFG)(path)[None], CFG["mean"], CFG["std"])[0]
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_grayscale_and_png_images_decode_to_rgb(tmp_path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    Image.new("L", (40, 50), 128).save(tmp_path / "d" / "a" / "gray.png")
    out = Decoder(CFG)(tmp_path / "d" / "a" / "gray.png")
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8


def test_fingerprint_tracks_files_labels_and_preprocessing(tmp_path):
    root = imagenet_folder(tmp_path / "val", labels={243, 559, 438})
    base = fingerprint(scan_folder(root), CFG)
    assert fingerprint(scan_folder(root), CFG) == base
    assert fingerprint(scan_folder(root), {**CFG, "crop_pct": 1.0}) != base
    assert fingerprint(scan_folder(root, limit=2), CFG) != base
    victim = next((root / synsets()[243]).iterdir())
    os.utime(victim, ns=(0, 0))
    assert fingerprint(scan_folder(root), CFG) != base


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_decode_once_matches_the_per_batch_loader(tmp_path, storage):
    root = imagenet_folder(tmp_path / "val", labels={243, 559, 438, 990})
    (root / synsets()[243] / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    folder = scan_folder(root)
    cache = decode_once(folder, CFG, batch_size=3, workers=0, cache_dir=tmp_path / "cache", storage=storage)
    loaded = [(images, indices) for images, indices, _ in folder_loader(folder, Decoder(CFG), 3, workers=0) if images is not None]
    assert torch.equal(cache.images, torch.cat([im for im, _ in loaded]))
    assert torch.equal(cache.sample_indices, torch.cat([ix for _, ix in loaded]))
    assert cache.labels.tolist() == [folder.samples[i].label for i in cache.sample_indices.tolist()]
    assert cache.skipped == [{"path": f"{synsets()[243]}/broken.jpg", "reason": "cannot identify image file"}]
    if storage == "disk":
        assert cache.storage.startswith("mmap:")
        # same size and mtime: same fingerprint, so the cache is reused, not decoded again
        victim = folder.samples[0].path
        st = victim.stat()
        victim.write_bytes(b"\0" * st.st_size)
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
        again = decode_once(scan_folder(root), CFG, cache_dir=tmp_path / "cache", storage="disk")
        assert again.storage == cache.storage and torch.equal(again.images, cache.images)
        assert again.skipped == cache.skipped


def test_class_map_without_data_is_an_error():
    with pytest.raises(TpoolError, match="--class-map goes with --data"):
        resolve_workload(None, None, "classes.txt", "evaluate")
