import json
import logging
import random
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from mtmm.data import shapes
from mtmm.data.shapes import COLOURS, SENTIMENTS, SHAPES, TAGS, prepare_shapes

SMALL = dict(train=60, val=10, test=10)


def _read(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:-[a-z]+)*", text.lower())


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = prepare_shapes(tmp_path_factory.mktemp("cache"), seed=3, train=400, val=5, test=5)
    return folder, _read(folder, "train")


@pytest.mark.parametrize("image_size", [64, 40])
def test_files_and_manifests(tmp_path, image_size):
    folder = prepare_shapes(tmp_path / "nested" / "cache", image_size=image_size, **SMALL)
    assert folder.parent == tmp_path / "nested" / "cache"
    assert folder.name.startswith("shapes-") and len(folder.name) == len("shapes-") + 12
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["counts"] == SMALL
    assert meta["generator_version"] == shapes.GENERATOR_VERSION
    assert meta["params"]["image_size"] == image_size
    assert meta["shapes"] == list(SHAPES) and meta["sentiments"] == list(SENTIMENTS)
    assert meta["tags"] == list(TAGS) and list(meta["colours"]) == list(COLOURS)
    for split, n in SMALL.items():
        records = _read(folder, split)
        assert len(records) == n
        assert len(list((folder / "images" / split).iterdir())) == n
        for i, rec in enumerate(records):
            assert rec["id"] == f"{split}-{i:05d}"
            assert rec["image"] == f"images/{split}/{i:05d}.png"
            with Image.open(folder / rec["image"]) as im:
                assert im.format == "PNG" and im.mode == "RGB"
                assert im.size == (image_size, image_size)
            assert rec["shape"] in SHAPES and rec["sentiment"] in SENTIMENTS
            assert rec["colour"] in COLOURS and rec["caption_colour"] in COLOURS
            assert isinstance(rec["size"], float) and isinstance(rec["match"], int)
            # The shape sits (almost) fully inside the image.
            assert rec["size"] * 0.95 <= rec["cx"] <= image_size - rec["size"] * 0.95
            assert rec["size"] * 0.95 <= rec["cy"] <= image_size - rec["size"] * 0.95


def test_reused_not_regenerated(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=shapes.__name__)
    first = prepare_shapes(tmp_path, **SMALL)
    assert sum("generating shapes dataset" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    (first / "sentinel").write_text("x")
    mtime = (first / "dataset.json").stat().st_mtime_ns
    second = prepare_shapes(str(tmp_path), **SMALL)
    assert second == first
    assert (second / "sentinel").exists()
    assert (second / "dataset.json").stat().st_mtime_ns == mtime
    assert not caplog.records


def test_byte_identical_across_cache_dirs(tmp_path):
    a = prepare_shapes(tmp_path / "a", seed=7, **SMALL)
    b = prepare_shapes(tmp_path / "b", seed=7, **SMALL)
    assert a.name == b.name
    assert _tree(a) == _tree(b)


def test_global_rng_untouched_and_samples_independent_of_counts(tmp_path):
    random.seed(123)
    torch.manual_seed(123)
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    few = prepare_shapes(tmp_path, train=10, val=2, test=2)
    assert random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)
    many = prepare_shapes(tmp_path, train=20, val=2, test=2)
    assert many != few
    assert _read(many, "train")[:10] == _read(few, "train")
    for i in range(10):
        rel = f"images/train/{i:05d}.png"
        assert (many / rel).read_bytes() == (few / rel).read_bytes()


@pytest.mark.parametrize("change", [dict(seed=1), dict(background="colour")])
def test_different_parameters_give_different_folder(tmp_path, change):
    base = prepare_shapes(tmp_path, **SMALL)
    other = prepare_shapes(tmp_path, **{**SMALL, **change})
    assert other != base and base.is_dir() and other.is_dir()
    assert (base / "images/train/00000.png").read_bytes() != (other / "images/train/00000.png").read_bytes()
    if "seed" in change:
        assert (base / "train.jsonl").read_bytes() != (other / "train.jsonl").read_bytes()


def test_labels_consistent(big):
    _, records = big
    n = len(records)
    assert all(r["match"] == int(r["caption_colour"] == r["colour"]) for r in records)
    assert 0.4 <= sum(r["match"] for r in records) / n <= 0.6
    assert {r["sentiment"] for r in records} == set(SENTIMENTS)
    assert {r["shape"] for r in records} == set(SHAPES)
    assert {r["colour"] for r in records} == set(COLOURS)

    named = 0
    for r in records:
        words = _words(r["text"])
        colours = [w for w in words if w in COLOURS]
        assert colours == [r["caption_colour"]], r["text"]
        mentioned = {s for s, syns in shapes._SHAPE_WORDS.items() for syn in syns if syn in words}
        assert mentioned <= {r["shape"]}, r["text"]  # never names a wrong shape
        named += bool(mentioned)
        # Sentiment is decidable from the text: only phrases of its own class occur.
        found = {s for s, ps in shapes._SENTIMENT_PHRASES.items() for p in ps if p in r["text"]}
        assert found == {r["sentiment"]}, r["text"]
    assert 0.1 <= named / n <= 0.3
    # Captions are varied, not a handful of fixed strings.
    assert len({r["text"] for r in records}) > n / 2


def test_tags_follow_geometry(big):
    _, records = big
    seen = set()
    for r in records:
        expected = ["left" if r["cx"] < 32 else "right", "top" if r["cy"] < 32 else "bottom"]
        if r["size"] >= 16:
            expected.append("large")
        elif r["size"] <= 13:
            expected.append("small")
        assert r["tags"] == expected
        seen.update(r["tags"])
        assert 10 * 0.99 <= r["size"] <= 22 * 1.01
    assert seen == set(TAGS)


def test_drawn_colour_at_centre_and_grey_background(big):
    folder, records = big
    corner_values = set()
    for r in records:
        with Image.open(folder / r["image"]) as im:
            px = im.load()
            centre = px[int(r["cx"]), int(r["cy"])]
            assert all(abs(a - b) <= 25 for a, b in zip(centre, COLOURS[r["colour"]])), (r, centre)
            corners = [(0, 0), (63, 0), (0, 63), (63, 63)]
            x, y = max(corners, key=lambda c: (c[0] - r["cx"]) ** 2 + (c[1] - r["cy"]) ** 2)
            assert ((x - r["cx"]) ** 2 + (y - r["cy"]) ** 2) ** 0.5 > r["size"] * 1.2
            red, green, blue = px[x, y]
            assert red == green == blue
            corner_values.add(red)
    assert len(corner_values) > 20  # noisy, not a flat background


def test_colour_background_is_not_grey(tmp_path):
    folder = prepare_shapes(tmp_path, background="colour", **SMALL)
    grey = 0
    for r in _read(folder, "train"):
        with Image.open(folder / r["image"]) as im:
            red, green, blue = im.getpixel((0, 0))
            grey += red == green == blue
    assert grey <= 2


def test_bad_background_raises(tmp_path):
    with pytest.raises(ValueError, match="grey") as err:
        prepare_shapes(tmp_path / "c", background="gray", **SMALL)
    assert "gray" in str(err.value)
    assert not (tmp_path / "c").exists()


def test_no_temp_folders_left(tmp_path):
    folder = prepare_shapes(tmp_path, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    def boom(folder, params, counts):
        (folder / "partial").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(shapes, "_generate", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_shapes(tmp_path, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_lost_race_uses_winner(tmp_path, monkeypatch):
    real_generate = shapes._generate
    winner = {}

    def generate_then_lose(folder, params, counts):
        real_generate(folder, params, counts)
        # Another process finishes first and renames its folder into place.
        final = tmp_path / f"shapes-{shapes._dataset_key(params)}"
        final.mkdir()
        (final / "winner").write_text("other process")
        winner["path"] = final

    monkeypatch.setattr(shapes, "_generate", generate_then_lose)
    folder = prepare_shapes(tmp_path, **SMALL)
    assert folder == winner["path"]
    assert (folder / "winner").read_text() == "other process"
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]
