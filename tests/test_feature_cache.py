"""The frozen-encoder feature cache: same metrics as running the encoders, computed once, reused without
running the encoders or decoding images, memory-mapped, invalidated by any change of encoder, weights, data or
transform, and checkpoints that evaluate without it."""

import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch

from mtmm.build import build_model
from mtmm.data.build import build_data
from mtmm.data.dataset import ManifestDataset
from mtmm.errors import UserError
from mtmm.eval import evaluate_checkpoint
from mtmm.cache.features import cache_paths, feature_caches
from mtmm.models.image import SmallCNN
from mtmm.models.text import HFTextEncoder
from mtmm.loop import StopSignal
from mtmm.train import train

FROZEN = ["encoder.image.freeze=true", "encoder.text.freeze=true", "encoder.image.channels=[8,8,16]",
          "encoder.text.hidden_size=32", "encoder.text.intermediate_size=64", "mtl.hidden=[32]"]
ALL = {(split, m) for split in ("train", "val", "test") for m in ("image", "text")}  # (split, modality) of a cache file
IMAGES, TEXTS = {key for key in ALL if key[1] == "image"}, {key for key in ALL if key[1] == "text"}


@pytest.fixture
def frozen_cfg(make_cfg, tmp_path):
    """make_cfg with both encoders frozen (small) and the feature cache in tmp_path/features."""
    return lambda *overrides: make_cfg(*FROZEN, f"trainer.feature_cache_dir={tmp_path / 'features'}", *overrides)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metrics_of(result: dict) -> dict:
    """split/checkpoint/task/metric -> value, for comparing two runs."""
    flat = {}
    for tag in ("best", "final"):
        for split in ("val", "test"):
            for task, values in result[tag][split].items():
                flat.update({f"{tag}/{split}/{task}/{name}": value for name, value in values.items()})
    return flat


def flat(metrics: dict) -> dict:
    return {f"{task}/{name}": value for task, values in metrics.items() for name, value in values.items()}


def log_lines(caplog, text: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.getMessage().startswith(text)]


@pytest.mark.parametrize("overrides", [
    # tokens and masks (text padded per batch, cached ones per split) and modality dropout; then a live text encoder
    ["fusion=middle", "fusion.dim=16", "fusion.heads=2", "data.image_size=32", "modality_dropout.image=0.3",
     "modality_dropout.text=0.3"],
    ["fusion=late", "encoder.text.freeze=false"],
])
def test_cached_run_has_the_metrics_of_an_uncached_one(frozen_cfg, tmp_path, overrides):
    train(frozen_cfg(*overrides, "trainer.feature_cache=false"), tmp_path / "live")
    train(frozen_cfg(*overrides), tmp_path / "cached")
    assert any((tmp_path / "features").iterdir())
    live, cached = metrics_of(summary(tmp_path / "live")), metrics_of(summary(tmp_path / "cached"))
    assert cached == pytest.approx(live, abs=1e-5)


def test_computed_once_then_reused_without_encoders_images_or_tokens(frozen_cfg, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="mtmm")
    train(frozen_cfg(f"data.image_cache_dir={tmp_path / 'images'}"), tmp_path / "first")
    assert len(log_lines(caplog, "feature cache: computed")) == 3 and not log_lines(caplog, "feature cache: reused")
    assert not (tmp_path / "images").exists()  # images served as features need no decoded-image cache
    files = {path: path.stat().st_ino for path in (tmp_path / "features").iterdir()}  # a rewrite makes a new file
    long_ago = time.time() - 40 * 86400
    for path in files:
        os.utime(path, (long_ago, long_ago))
    assert sorted(tuple(path.name.split("-")[:2]) for path in files) == sorted(ALL)  # no temp file left either

    def boom(*args, **kwargs):
        raise AssertionError("a cached modality was encoded, decoded or tokenised")

    caplog.clear()
    with monkeypatch.context() as patch:
        patch.setattr(SmallCNN, "forward", boom)
        patch.setattr(HFTextEncoder, "forward", boom)
        patch.setattr(ManifestDataset, "images", boom)
        train(frozen_cfg(), tmp_path / "second")
    assert len(log_lines(caplog, "feature cache: reused")) == 3 and not log_lines(caplog, "feature cache: computed")
    assert {path: path.stat().st_ino for path in (tmp_path / "features").iterdir()} == files  # not rewritten
    assert all(path.stat().st_mtime > long_ago + 39 * 86400 for path in files)  # marked used (mtmm-cache prune)
    assert metrics_of(summary(tmp_path / "second")) == metrics_of(summary(tmp_path / "first"))


def test_resumed_run_reuses_the_cache_and_equals_the_uninterrupted_one(frozen_cfg, tmp_path, monkeypatch, caplog):
    train(frozen_cfg(), tmp_path / "whole")
    calls = iter(range(1000))
    with monkeypatch.context() as patch, pytest.raises(UserError, match="stopped"):
        patch.setattr(StopSignal, "requested", lambda self: next(calls) == 1)  # after the second step
        train(frozen_cfg(), tmp_path / "part")
    caplog.clear()
    caplog.set_level(logging.INFO, logger="mtmm")
    # The resumed model starts from fresh random weights: the cache must be keyed by the restored ones.
    train(frozen_cfg(f"resume={tmp_path / 'part'}"))
    assert len(log_lines(caplog, "feature cache: reused")) == 3 and not log_lines(caplog, "feature cache: computed")
    assert metrics_of(summary(tmp_path / "part")) == pytest.approx(metrics_of(summary(tmp_path / "whole")), abs=1e-6)


def test_best_checkpoint_of_a_cached_run_evaluates_without_the_cache(frozen_cfg, tmp_path):
    train(frozen_cfg("fusion=middle", "fusion.dim=16", "fusion.heads=2", "data.image_size=32"), tmp_path / "run")
    recorded = summary(tmp_path / "run")["best"]["test"]
    metrics = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", split="test",
                                  run_dir=tmp_path / "eval", device="cpu")
    assert flat(metrics) == pytest.approx(flat(recorded), abs=1e-5)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the mappings from /proc (Linux)")
def test_loaded_cache_is_memory_mapped_from_its_files(frozen_cfg):
    cfg = frozen_cfg()
    data = build_data(cfg)
    model = build_model(cfg, data.tasks, data.tokenizer)
    caches = feature_caches(cfg, model, data, torch.device("cpu"))
    mapped = {}  # file -> its mapped address ranges
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6:
            start, end = (int(part, 16) for part in fields[0].split("-"))
            mapped.setdefault(fields[5], []).append((start, end))
    for split, files in cache_paths(cfg, model, data).items():
        for modality, path in files.items():
            for name, tensor in caches[split][modality].items():
                address = tensor.data_ptr()
                assert any(start <= address < end for start, end in mapped.get(str(path), [])), (split, modality, name)
    assert caches["train"]["image"]["pooled"].shape == (len(data.datasets["train"]), 16)
    assert caches["train"]["text"]["tokens"].shape[::2] == (len(data.datasets["train"]), 32)


def cache_names(cfg) -> dict[tuple[str, str], str]:
    """(split, modality) -> cache file name for the config, with the model initialised from its seed."""
    torch.manual_seed(cfg.seed)
    data = build_data(cfg)
    model = build_model(cfg, data.tasks, data.tokenizer)
    paths = cache_paths(cfg, model, data)
    return {(split, m): path.name for split, files in paths.items() for m, path in files.items()}


def changed(before: dict, after: dict) -> set[tuple[str, str]]:
    return {key for key in before if before[key] != after[key]}


def test_key_changes_with_weights_data_transform_and_encoder(frozen_cfg, tmp_path):
    base = cache_names(frozen_cfg())
    assert cache_names(frozen_cfg()) == base  # deterministic
    assert changed(base, cache_names(frozen_cfg("seed=1"))) == ALL  # other initial weights
    assert changed(base, cache_names(frozen_cfg("data.image_size=32"))) == IMAGES  # transform
    assert changed(base, cache_names(frozen_cfg("encoder.text.max_length=8"))) == TEXTS  # tokenisation
    assert changed(base, cache_names(frozen_cfg("encoder.text.num_layers=1"))) == TEXTS  # encoder
    assert ("train", "image") in changed(base, cache_names(frozen_cfg("data.source.train=64")))  # other samples
    # One image file rewritten: only the image cache of its split.
    image = build_data(frozen_cfg()).datasets["val"].image_paths[0]
    stamp = image.stat()
    try:
        os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
        assert changed(base, cache_names(frozen_cfg())) == {("val", "image")}
    finally:
        os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


def test_key_changes_with_the_torchvision_weight_file(make_cfg, tmp_path):
    import torchvision
    names = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"resnet18-{seed}.pth"
        torch.save(torchvision.models.resnet18().state_dict(), path)
        names.append(cache_names(make_cfg("encoder/image=resnet18", f"encoder.image.weights={path}",
                                          "encoder.image.freeze=true", "tasks=img", "encoder/text=none",
                                          f"trainer.feature_cache_dir={tmp_path}")))
    assert names[0].keys() == {(split, "image") for split in ("train", "val", "test")}
    assert changed(names[0], names[1]) == set(names[0])


def test_nothing_is_cached_without_a_frozen_encoder(frozen_cfg, tmp_path):
    cfg = frozen_cfg("encoder.image.freeze=false", "encoder.text.freeze=false")
    data = build_data(cfg)
    model = build_model(cfg, data.tasks, data.tokenizer)
    assert feature_caches(cfg, model, data, torch.device("cpu")) == {}
    assert not (tmp_path / "features").exists()
