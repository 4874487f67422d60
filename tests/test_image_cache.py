"""The decoded-image cache: the same pixels as decoding, so the same training; made once and reused without
decoding; a new file when an image or the transform changes; never used when incomplete, too large for
data.image_cache_gib or the disk; a clear error for images that decode to different sizes."""

import json
import logging
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from mtmm.data.dataset import ManifestDataset
from mtmm.tasks import TaskSpec
from mtmm.data.images import ImageTransform
from mtmm.data.readers import read_manifest
from mtmm.errors import UserError
from mtmm.eval import evaluate_checkpoint
from mtmm.cache.images import HEADER_BYTES, attach_image_caches
from mtmm.train import train

SHAPE = TaskSpec(name="img", type="multiclass", target="shape", classes=("circle", "square", "star"))
CPU = torch.device("cpu")


def cache_cfg(folder: Path, gib: float = 8, batch: int = 2):
    return OmegaConf.create({"data": {"image_cache_gib": gib, "image_cache_dir": str(folder),
                                      "eval_batch_size": batch, "num_workers": 0}})


def small_split(folder: Path, sizes=((8, 6), (8, 6), (8, 6), (8, 6)), transform=None, check_images=True,
                absent=(2,)) -> SimpleNamespace:
    """A split of PNGs of different colours (row `absent` has no image), as build_data's `data`."""
    records = []
    for row, size in enumerate(sizes):
        if row in absent:
            records.append({"image": "", "shape": "star"})
            continue
        Image.new("RGB", size, color=(40 * row, 255 - 30 * row, 7 * row)).save(folder / f"{row}.png")
        records.append({"image": f"{row}.png", "shape": "circle"})
    manifest = folder / "train.jsonl"
    manifest.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    dataset = ManifestDataset(read_manifest(manifest), manifest, folder, [SHAPE], transform or ImageTransform(),
                              check_images=check_images)
    return SimpleNamespace(datasets={"train": dataset})


def reread(folder: Path, transform=None) -> SimpleNamespace:
    """small_split's manifest and files read again (a new run over the same data)."""
    dataset = ManifestDataset(read_manifest(folder / "train.jsonl"), folder / "train.jsonl", folder, [SHAPE],
                              transform or ImageTransform())
    return SimpleNamespace(datasets={"train": dataset})


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.u8")) if folder.exists() else []


def decoded(dataset: ManifestDataset, indices) -> torch.Tensor:
    store, dataset.image_store = dataset.image_store, None
    try:
        return dataset.images(indices)
    finally:
        dataset.image_store = store


def test_cached_rows_are_the_decoded_pixels(tmp_path):
    data = small_split(tmp_path)
    attach_image_caches(cache_cfg(tmp_path / "cache"), data, ["train"], CPU)
    dataset = data.datasets["train"]
    assert dataset.image_store is not None and len(cache_files(tmp_path / "cache")) == 1
    order = [3, 0, 2, 1, 3]
    cached = dataset.batch(order)["image"]
    assert cached.dtype == torch.uint8 and torch.equal(cached, decoded(dataset, order))
    assert cached[2].sum() == 0 and cached[0].sum() > 0  # the absent image is a blank row
    assert len(set(cached[:2].sum(dim=(1, 2, 3)).tolist())) == 2  # rows differ: each index reads its own row
    path = cache_files(tmp_path / "cache")[0]
    assert path.stat().st_size == HEADER_BYTES + 4 * 3 * 6 * 8


def test_a_loader_worker_reads_the_cache(tmp_path):
    data = small_split(tmp_path)
    attach_image_caches(cache_cfg(tmp_path / "cache"), data, ["train"], CPU)
    dataset = data.datasets["train"]
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=lambda batch: batch)
    images = torch.cat([batch["image"] for batch in loader])
    assert torch.equal(images, decoded(dataset, [0, 1, 2, 3]))


def test_training_with_the_cache_equals_decoding_and_reuse_decodes_nothing(make_cfg, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="mtmm")
    # The layout of one cache folder (MTMM_CACHE): generated data at its top, decoded images in images/.
    cache = [f"data.source.cache_dir={tmp_path}", f"data.image_cache_dir={tmp_path / 'images'}"]
    train(make_cfg(*cache), tmp_path / "first")  # makes the cache files
    assert [p.name.split("-")[0] for p in cache_files(tmp_path / "images")] == ["test", "train", "val"]
    assert any("image cache: decoded the 96 images of train" in r.getMessage() for r in caplog.records)
    train(make_cfg(*cache, "data.image_cache_gib=0"), tmp_path / "decoding")
    loads = []
    original = ManifestDataset.load_image
    monkeypatch.setattr(ManifestDataset, "load_image", lambda self, *args: loads.append(1) or original(self, *args))
    caplog.clear()
    train(make_cfg(*cache), tmp_path / "reusing")
    assert not loads  # every split is read from the cache
    assert sum("image cache: reused" in r.getMessage() for r in caplog.records) == 3
    runs = [steps(tmp_path / run) for run in ("first", "decoding", "reusing")]
    assert runs[0] == runs[1] == runs[2] and len(runs[0]) > 6
    # mtmm-eval finds the training run's file in the evaluating user's cache folder (never the checkpoint's choice).
    metrics = evaluate_checkpoint(tmp_path / "reusing" / "checkpoints" / "best.pt", run_dir=tmp_path / "eval",
                                  device="cpu", cache_dir=tmp_path)
    assert not loads and metrics == json.loads((tmp_path / "reusing" / "summary.json").read_text())["best"]["test"]
    # Without the file, one evaluation decodes as it reads and leaves no new file behind.
    for path in cache_files(tmp_path / "images"):
        path.unlink()
    again = evaluate_checkpoint(tmp_path / "reusing" / "checkpoints" / "best.pt", run_dir=tmp_path / "eval2",
                                device="cpu", cache_dir=tmp_path)
    assert again == metrics and len(loads) == 32 and not cache_files(tmp_path / "images")


def steps(run: Path) -> list[dict]:
    """Every record of metrics.jsonl without its timings."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in record.items() if key not in ("samples_per_s", "time")} for record in records]


def test_a_changed_image_or_transform_makes_a_new_file(tmp_path):
    folder = tmp_path / "cache"
    data = small_split(tmp_path)
    attach_image_caches(cache_cfg(folder), data, ["train"], CPU)
    first = cache_files(folder)
    Image.new("RGB", (8, 6), color=(1, 2, 3)).save(tmp_path / "1.png")  # new pixels, new mtime
    changed = reread(tmp_path)
    attach_image_caches(cache_cfg(folder), changed, ["train"], CPU)
    changed = changed.datasets["train"]
    assert len(cache_files(folder)) == 2 and first[0] in cache_files(folder)  # the old file is left as it was
    assert changed.batch([1])["image"][0, :, 0, 0].tolist() == [1, 2, 3]
    resized = reread(tmp_path, transform=ImageTransform(size=4))
    attach_image_caches(cache_cfg(folder), resized, ["train"], CPU)
    assert len(cache_files(folder)) == 3 and resized.datasets["train"].batch([0])["image"].shape == (1, 3, 4, 4)


def test_a_cut_short_or_foreign_file_is_made_again(tmp_path, caplog):
    folder = tmp_path / "cache"
    data = small_split(tmp_path)
    attach_image_caches(cache_cfg(folder), data, ["train"], CPU)
    path = cache_files(folder)[0]
    whole = path.read_bytes()
    path.write_bytes(whole[:-10])
    again = reread(tmp_path)
    attach_image_caches(cache_cfg(folder), again, ["train"], CPU)
    assert "incomplete or not ours" in caplog.text and path.read_bytes() == whole
    # A file cut short while in use: the batch that reaches past its end says which file and what to do.
    path.write_bytes(whole[:HEADER_BYTES + 3 * 6 * 8])
    with pytest.raises(UserError, match=rf"{path.name} ends before row 3; delete the file"):
        again.datasets["train"].batch([0, 3])


def test_over_the_limit_or_the_free_disk_images_are_decoded_per_step(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="mtmm")
    data = small_split(tmp_path)
    attach_image_caches(cache_cfg(tmp_path / "cache", gib=1e-6), data, ["train"], CPU)
    assert data.datasets["train"].image_store is None and "over data.image_cache_gib=1e-06" in caplog.text
    attach_image_caches(cache_cfg(tmp_path / "cache", gib=0), data, ["train"], CPU)
    assert data.datasets["train"].image_store is None and not cache_files(tmp_path / "cache")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=1 << 40, used=0, free=1 << 20))
    attach_image_caches(cache_cfg(tmp_path / "cache"), data, ["train"], CPU)
    assert data.datasets["train"].image_store is None and "GiB free; its images are decoded per step" in caplog.text
    assert not list((tmp_path / "cache").iterdir())  # no file, no temp file
    assert data.datasets["train"].batch([0, 1])["image"].shape == (2, 3, 6, 8)  # decoded as before


def test_images_that_decode_to_different_sizes_fail_the_build_with_file_and_line(tmp_path):
    # Not checked up front (data.check_images=false) and no data.image_size: the first image sets the size.
    data = small_split(tmp_path, sizes=((8, 6), (8, 6), (8, 6), (9, 6)), check_images=False, absent=())
    with pytest.raises(UserError, match=r"line 4: image .*3\.png is \(3, 6, 9\) but the split's first image is "
                                        r"\(3, 6, 8\); set data\.image_size"):
        attach_image_caches(cache_cfg(tmp_path / "cache", batch=1), data, ["train"], CPU)
    assert not list((tmp_path / "cache").iterdir())  # the temp file is removed


def test_a_folder_that_cannot_be_written_means_no_cache(tmp_path, caplog):
    (tmp_path / "a-file").write_text("not a folder")
    data = small_split(tmp_path)
    attach_image_caches(cache_cfg(tmp_path / "a-file" / "images"), data, ["train"], CPU)
    assert data.datasets["train"].image_store is None and "its images are decoded per step" in caplog.text
    assert (tmp_path / "a-file").read_text() == "not a folder"


@pytest.mark.parametrize("bad", ["eight", -1, True])
def test_a_bad_limit_is_refused_with_what_is_accepted(tmp_path, bad):
    with pytest.raises(UserError, match=r"data.image_cache_gib=.*a number of GiB >= 0"):
        attach_image_caches(cache_cfg(tmp_path / "cache", gib=bad), small_split(tmp_path), ["train"], CPU)


def test_a_missing_image_not_checked_up_front_names_its_line(tmp_path):
    data = small_split(tmp_path, check_images=False, absent=())
    (tmp_path / "1.png").unlink()
    with pytest.raises(UserError, match=r"line 2: cannot read image .*1\.png"):
        attach_image_caches(cache_cfg(tmp_path / "cache"), data, ["train"], CPU)
    assert not list((tmp_path / "cache").iterdir())


def test_without_a_known_size_an_absent_image_is_a_blank_of_the_batch_size(tmp_path):
    data = small_split(tmp_path, check_images=False, absent=(2,))  # no data.image_size, sizes not read up front
    images = data.datasets["train"].batch([2, 0, 1])["image"]
    assert images.shape == (3, 3, 6, 8) and images[0].sum() == 0 and images[1].sum() > 0


def test_reuse_marks_the_file_used(tmp_path):
    data = small_split(tmp_path)
    attach_image_caches(cache_cfg(tmp_path / "cache"), data, ["train"], CPU)
    (path,) = cache_files(tmp_path / "cache")
    long_ago = time.time() - 40 * 86400
    os.utime(path, (long_ago, long_ago))
    attach_image_caches(cache_cfg(tmp_path / "cache"), reread(tmp_path), ["train"], CPU)
    assert time.time() - path.stat().st_mtime < 86400  # what mtmm-cache prune goes by
