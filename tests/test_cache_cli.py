"""mtmm-cache: lists what the cache folder holds, prunes entries by the time a run last used them (which reuse
refreshes), removes stale temp files, and touches nothing mtmm did not make, whatever its name."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mtmm.cache.cli import human, main, size_of
from mtmm.data import shapes
from mtmm.data.dataset import ManifestDataset
from mtmm.tasks import TaskSpec
from mtmm.data.images import ImageTransform
from mtmm.data.readers import read_manifest
from mtmm.data.shapes import SHAPES, TEMP_PREFIX, prepare_shapes
from mtmm.cache.features import feature_caches
from mtmm.cache.images import attach_image_caches
from mtmm.models.image import SmallCNN

DAY = 86400
CPU = torch.device("cpu")
HEX = "0123456789abcdef" * 4  # a sha256-long hex name, as the caches' keys are


def aged(path: Path, days: float) -> Path:
    stamp = time.time() - days * DAY
    os.utime(path, (stamp, stamp), follow_symlinks=False)
    return path


def make(path: Path, size: int = 10, days: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return aged(path, days)


def shapes_data(folder: Path, splits=("train", "val")) -> SimpleNamespace:
    """Splits of a generated dataset, as build_data's `data` (images only)."""
    task = TaskSpec(name="img", type="multiclass", target="shape", classes=SHAPES)
    datasets = {split: ManifestDataset(read_manifest(folder / f"{split}.jsonl"), folder / f"{split}.jsonl", folder,
                                       [task], ImageTransform()) for split in splits}
    return SimpleNamespace(datasets=datasets, tokenizer=None)


def real_entries(root: Path) -> dict[str, Path]:
    """Entries made by mtmm's own code: two generated datasets, the decoded images of two splits, the features of
    a frozen encoder on one split."""
    old, new = prepare_shapes(root, train=4, val=2, test=2), prepare_shapes(root, seed=1, train=4, val=2, test=2)
    data = shapes_data(old)
    cfg = OmegaConf.create({"data": {"image_cache_gib": 1, "image_cache_dir": str(root / "images"),
                                     "eval_batch_size": 2, "num_workers": 0},
                            "trainer": {"feature_cache_dir": str(root / "features")},
                            "encoder": {"image": {"channels": [4]}}})
    attach_image_caches(cfg, data, ["train", "val"], CPU)
    model = SimpleNamespace(encoders=nn.ModuleDict({"image": SmallCNN([4], freeze=True)}))
    feature_caches(cfg, model, SimpleNamespace(datasets={"train": data.datasets["train"]}, tokenizer=None), CPU)
    (images,) = [path for path in (root / "images").iterdir() if path.name.startswith("train-")]
    (other_images,) = [path for path in (root / "images").iterdir() if path.name.startswith("val-")]
    (features,) = (root / "features").iterdir()
    return {"old": old, "new": new, "images": images, "other_images": other_images, "features": features}


def leftover(folder: Path, entry_name: str) -> Path:
    """A temp file exactly as write_atomically names it, as if a run was killed while writing `entry_name`."""
    handle, temp = tempfile.mkstemp(prefix=f".{entry_name}.", suffix=".tmp", dir=folder)
    os.write(handle, b"x" * 9)
    os.close(handle)
    return Path(temp)


@pytest.fixture
def cache(tmp_path) -> SimpleNamespace:
    """A cache folder with old and recent entries of every kind, temp leftovers and files that are not mtmm's."""
    root = tmp_path / "cache"
    made = real_entries(root)
    aged(made["old"], 40)
    aged(made["images"], 40)
    aged(made["other_images"], 1)
    aged(made["features"], 31)
    aged(leftover(root / "images", made["images"].name), 2)    # a build killed two days ago
    fresh = leftover(root / "images", made["other_images"].name)  # a build in progress
    aged(Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=root)), 2)  # a generation killed two days ago
    make(root / "notes.txt", 3, days=400)                       # not ours
    make(root / "images" / "README", 3, days=400)               # not ours
    kept = {made["new"], made["other_images"], fresh, root / "notes.txt", root / "images" / "README"}
    return SimpleNamespace(root=root, made=made, kept=kept)


def present(root: Path) -> set[Path]:
    """Every file, folder and link under root (without following links)."""
    return {Path(folder, name) for folder, dirs, files in os.walk(root) for name in dirs + files}


def tree(path: Path) -> set[Path]:
    return {path} | (present(path) if path.is_dir() and not path.is_symlink() else set())


def test_listing_names_every_entry_with_its_size_and_last_use(cache, capsys):
    sizes = sum(size_of(cache.made[name]) for name in ("old", "new", "images", "other_images", "features"))
    assert main(["--root", str(cache.root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"5 entries, {human(sizes)} in {cache.root}"
    assert out[0].split()[0] == "dataset" and "used   40.0 days ago" in out[0]  # oldest use first
    assert [line.split()[0] for line in out[:5]] == ["dataset", "images", "features", "images", "dataset"]
    assert len(out) == 6  # the temp files and the README match no entry pattern: not even listed


def test_prune_removes_entries_unused_for_the_days_given_and_stale_temp_files_only(cache, capsys):
    before = present(cache.root)
    assert main(["--root", str(cache.root), "prune", "--unused-days", "30", "--dry-run"]) == 0
    assert present(cache.root) == before and "would remove" in capsys.readouterr().out
    assert main(["--root", str(cache.root), "prune", "--unused-days", "30"]) == 0
    assert present(cache.root) == set().union(*map(tree, cache.kept)) | {cache.root / "images", cache.root / "features"}
    assert capsys.readouterr().out.splitlines()[-1].startswith("5 entries, ")


def test_what_mtmm_did_not_make_survives_prune_whatever_its_name(tmp_path, capsys):
    root, outside = tmp_path / "cache", tmp_path / "outside"
    made = real_entries(root)
    elsewhere = real_entries(outside)  # real mtmm entries, but outside the cache root: reached only through links
    mine = make(root / "shapes-mine" / "data.csv", 5).parent
    renamed = root / f"shapes-{HEX[:12]}"  # a user's copy of a generated dataset: its name is not its key
    renamed.mkdir()
    (renamed / "dataset.json").write_bytes((made["old"] / "dataset.json").read_bytes())
    notes = root / "features" / "notes.pt"
    torch.save({"notes": torch.ones(2)}, notes)
    named_like_features = root / "features" / f"train-image-{HEX}.pt"
    torch.save({"pooled": torch.ones(2, 3)}, named_like_features)  # a torch file, but not what the cache stores
    make(root / "images" / "x.u8", 5000)
    make(root / "images" / f"train-{HEX}.u8", 5000)
    links = [root / f"shapes-{HEX[12:24]}", root / "images" / f"val-{HEX}.u8", root / "features" / f"val-text-{HEX}.pt"]
    for link, target in zip(links, [elsewhere["old"], elsewhere["images"], elsewhere["features"]]):
        link.symlink_to(target)
    temp_links = [root / ".shapes-tmp-abcd1234", root / "images" / f".train-{HEX}.u8.abcd1234.tmp"]  # exact forms
    for link, target in zip(temp_links, [elsewhere["new"], elsewhere["other_images"]]):
        link.symlink_to(target)
    make(root / ".shapes-tmp-mine" / "x", 1)
    make(root / "images" / f".train-{HEX}.u8.tmp", 1)  # not write_atomically's form (no random part)
    for path in [*root.rglob("*"), *outside.rglob("*")]:
        aged(path, 400)
    ours = {made["old"], made["new"], made["images"], made["other_images"], made["features"]}
    theirs = present(root) - set().union(*map(tree, ours))
    outside_before = present(outside)

    assert main(["--root", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("5 entries, ")
    alone = {Path(line.split("left alone")[1].strip()) for line in out if "not mtmm's, left alone" in line}
    assert alone == {mine, renamed, notes, named_like_features, root / "images" / "x.u8",
                     root / "images" / f"train-{HEX}.u8", *links}

    assert main(["--root", str(root), "prune", "--unused-days", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("5 entries, ")
    assert present(root) == theirs | {root / "images", root / "features"}
    assert present(outside) == outside_before and all(link.exists() for link in links + temp_links)  # all intact


def test_a_dataset_of_an_earlier_generator_version_is_still_mtmms(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shapes, "GENERATOR_VERSION", 0)
    earlier = prepare_shapes(tmp_path, train=1, val=1, test=1)
    monkeypatch.undo()
    assert prepare_shapes(tmp_path, train=1, val=1, test=1) != earlier  # a new key: generated again
    assert main(["--root", str(tmp_path), "prune", "--unused-days", "0"]) == 0
    assert not list(tmp_path.iterdir()) and capsys.readouterr().out.splitlines()[-1].startswith("2 entries, ")


def test_a_symlinked_cache_folder_is_not_looked_into(tmp_path, capsys):
    root, outside = tmp_path / "cache", tmp_path / "outside"
    elsewhere = real_entries(outside)
    root.mkdir()
    (root / "images").symlink_to(outside / "images")
    aged(elsewhere["images"], 400)
    assert main(["--root", str(root), "prune", "--unused-days", "0"]) == 0
    assert elsewhere["images"].exists() and capsys.readouterr().out.splitlines()[-1].startswith("0 entries, ")
    assert main(["--root", str(root)]) == 0
    assert f"not mtmm's, left alone  {root / 'images'}" in capsys.readouterr().out


def test_bad_days_and_a_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--root", str(tmp_path), "prune", "--unused-days", "-1"])
    assert stop.value.code == 2 and "--unused-days -1: use a number of days >= 0" in capsys.readouterr().err
    assert main(["--root", str(tmp_path / "none"), "prune", "--unused-days", "0"]) == 0
    assert "no cache folder" in capsys.readouterr().out


def test_reusing_a_generated_dataset_marks_it_used(tmp_path):
    folder = prepare_shapes(tmp_path, train=4, val=2, test=2)
    aged(folder, 40)
    assert prepare_shapes(tmp_path, train=4, val=2, test=2) == folder
    assert time.time() - folder.stat().st_mtime < DAY


def test_the_installed_command(tmp_path):
    prepare_shapes(tmp_path, train=1, val=1, test=1)
    make(tmp_path / "images" / f"val-{HEX}.u8", 5)
    done = subprocess.run([str(Path(sys.executable).parent / "mtmm-cache"), "--root", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "1 entries, " in done.stdout and "not mtmm's, left alone" in done.stdout
