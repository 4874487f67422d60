"""mtmm-cache: lists what the cache folder holds, prunes entries by the time a run last used them (which reuse
refreshes), removes stale temp files, and touches nothing else."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtmm.cache_cli import main
from mtmm.data.shapes import prepare_shapes

DAY = 86400


def aged(path: Path, days: float) -> Path:
    stamp = time.time() - days * DAY
    os.utime(path, (stamp, stamp))
    return path


def make(path: Path, size: int = 10, days: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return aged(path, days)


@pytest.fixture
def root(tmp_path) -> Path:
    """A cache folder with old and recent entries of every kind, temp leftovers and files that are not mtmm's."""
    root = tmp_path / "cache"
    make(root / "shapes-old" / "train" / "0.png", 100)
    aged(root / "shapes-old", 40)
    make(root / "shapes-new" / "train.jsonl", 5)
    make(root / "images" / "train-old.u8", 2048, days=40)
    make(root / "images" / "train-new.u8", 30, days=1)
    make(root / "features" / "val-image-old.pt", 70, days=31)
    make(root / "images" / ".train-x.u8.abc.tmp", 9, days=2)   # a build killed two days ago
    make(root / "images" / ".train-y.u8.def.tmp", 9)           # a build in progress
    make(root / "notes.txt", 3, days=400)                      # not ours
    make(root / "images" / "README", 3, days=400)              # not ours
    return root


def present(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()}


def test_listing_names_every_entry_with_its_size_and_last_use(root, capsys):
    assert main(["--root", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"5 entries, {(100 + 5 + 2048 + 30 + 70) / 1024:.1f} KiB in {root}"
    assert out[0].split()[:2] == ["dataset", "100"] and "used   40.0 days ago" in out[0]  # oldest use first
    assert [line.split()[0] for line in out[:-1]] == ["dataset", "images", "features", "images", "dataset"]


def test_prune_removes_entries_unused_for_the_days_given_and_stale_temp_files_only(root, capsys):
    before = present(root)
    assert main(["--root", str(root), "prune", "--unused-days", "30", "--dry-run"]) == 0
    assert present(root) == before and "would remove" in capsys.readouterr().out
    assert main(["--root", str(root), "prune", "--unused-days", "30"]) == 0
    assert present(root) == {"shapes-new/train.jsonl", "images/train-new.u8", "images/.train-y.u8.def.tmp",
                             "notes.txt", "images/README"}
    assert not (root / "shapes-old").exists()
    assert capsys.readouterr().out.splitlines()[-1].startswith("4 entries, ")


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
    make(tmp_path / "images" / "val-a.u8", 5)
    done = subprocess.run([str(Path(sys.executable).parent / "mtmm-cache"), "--root", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "1 entries, 5 B" in done.stdout
