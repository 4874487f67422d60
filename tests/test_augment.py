"""Training-time augmentation: per sample, seeded by (seed, epoch, index); training split only; the image cache
serves the same augmented pixels; a resumed run equals an uninterrupted one; frozen image features are not cached."""

import json
import logging

import pytest
import torch

from mtmm.cache.images import attach_image_caches
from mtmm.data.build import build_data, build_loader
from mtmm.errors import UserError
from mtmm.loop import StopSignal
from mtmm.train import train

SMALL = ["data.source.train=16", "data.source.val=8", "data.source.test=8", "data.batch_size=8",
         "data.image_size=16", "encoder.image.channels=[4,4,8]", "encoder.text.hidden_size=16",
         "encoder.text.intermediate_size=32", "mtl.hidden=[16]", "data.image_cache_gib=0"]


def first_batch(cfg, epoch=1, split="train"):
    data = build_data(cfg)
    loader = build_loader(cfg, data, split, seed=cfg.seed)
    if split == "train":
        loader.sampler.set_epoch(epoch)
    return next(iter(loader))


def test_same_seed_same_batch_other_seed_or_epoch_differs(make_cfg):
    light = first_batch(make_cfg(*SMALL, "augment=light"))
    again = first_batch(make_cfg(*SMALL, "augment=light"))
    assert light["image"].shape == (8, 3, 16, 16) and torch.equal(light["image"], again["image"])
    other_seed = make_cfg(*SMALL, "augment=light", "seed=1")
    # the same samples under another seed: compare by index (the order changes with the seed too)
    data = build_data(other_seed)
    same_rows = data.datasets["train"].batch([(1, int(i)) for i in light["index"]])["image"]
    assert not torch.equal(same_rows, light["image"])
    data = build_data(make_cfg(*SMALL, "augment=light"))
    assert torch.equal(data.datasets["train"].batch([(1, int(i)) for i in light["index"]])["image"], light["image"])
    assert not torch.equal(data.datasets["train"].batch([(2, int(i)) for i in light["index"]])["image"],
                           light["image"])
    strong = data.datasets["train"].batch([(1, int(i)) for i in light["index"]])["image"]
    assert strong.dtype == torch.uint8


def test_val_and_test_are_never_augmented_and_none_is_unchanged(make_cfg):
    for split in ("val", "test"):
        plain = first_batch(make_cfg(*SMALL), split=split)
        assert torch.equal(first_batch(make_cfg(*SMALL, "augment=strong"), split=split)["image"], plain["image"])
    data = build_data(make_cfg(*SMALL, "augment=light"))
    assert data.datasets["train"].transform.size == 18 and data.datasets["val"].transform.size == 16
    assert data.datasets["train"].batch([0, 1])["image"].shape == (2, 3, 16, 16)  # untagged: the centre crop


def test_the_image_cache_serves_the_same_augmented_pixels(make_cfg, tmp_path):
    cfg = make_cfg(*SMALL, "augment=strong", "data.image_cache_gib=1", f"data.image_cache_dir={tmp_path}")
    live = build_data(cfg)
    cached = build_data(cfg)
    attach_image_caches(cfg, cached, ["train"], torch.device("cpu"))
    assert cached.datasets["train"].image_store is not None
    assert cached.datasets["train"].image_store.shape[2:] == (18, 18)
    keys = [(3, i) for i in range(16)]
    assert torch.equal(cached.datasets["train"].batch(keys)["image"], live.datasets["train"].batch(keys)["image"])


def test_a_worker_gives_the_same_augmented_batches(make_cfg):
    cfg = make_cfg(*SMALL, "augment=light")
    data = build_data(cfg)
    cfg.data.num_workers, cfg.data.persistent_workers = 1, True
    loader = build_loader(cfg, data, "train", seed=0)
    seen = []
    for epoch in (1, 2):  # a persistent worker still sees each epoch's number (it comes with the indices)
        loader.sampler.set_epoch(epoch)
        seen.append(torch.cat([batch["image"] for batch in loader]))
    assert not torch.equal(seen[0], seen[1])
    loader.sampler.set_epoch(2)
    assert torch.equal(torch.cat([data.datasets["train"].batch(list(b))["image"]
                                  for b in torch.utils.data.BatchSampler(loader.sampler, 8, False)]), seen[1])


def test_a_resumed_run_equals_the_uninterrupted_one(make_cfg, tmp_path):
    run = [*SMALL, "augment=light", "trainer.checkpoint_every=1", "modality_dropout.text=0.3"]
    train(make_cfg(*run), tmp_path / "whole")
    calls = iter(range(1000))
    with pytest.MonkeyPatch.context() as patch, pytest.raises(UserError, match="stopped"):
        patch.setattr(StopSignal, "requested", lambda self: next(calls) == 0)  # after the first step, mid-epoch
        train(make_cfg(*run), tmp_path / "part")
    train(make_cfg(*run, f"resume={tmp_path / 'part'}"))
    whole, part = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("whole", "part"))
    assert part["final"] == whole["final"] and part["best"] == whole["best"]
    weights = [torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)["model"]
               for name in ("whole", "part")]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_frozen_image_encoder_skips_the_feature_cache_and_says_so(make_cfg, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mtmm")
    train(make_cfg(*SMALL, "augment=light", "encoder.image.freeze=true", "trainer.epochs=1",
                   f"trainer.feature_cache_dir={tmp_path / 'features'}"), tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if "not for the image features of train" in r.getMessage()]
    assert len(lines) == 1
    names = sorted(path.name.split("-")[0] + "-" + path.name.split("-")[1] for path in (tmp_path / "features").iterdir())
    assert names == ["test-image", "val-image"]  # val/test are not augmented: still cached


def test_bad_values_name_the_key_and_what_is_accepted(make_cfg):
    with pytest.raises(UserError, match=r"augment.policy='autoaugment'; use null or one of"):
        build_data(make_cfg(*SMALL, "augment=light", "augment.policy=autoaugment"))
    with pytest.raises(UserError, match=r"augment.scale"):
        build_data(make_cfg(*SMALL, "augment=light", "augment.scale=[0.5,2]"))


def test_a_sample_gets_torchvisions_pixels_whatever_its_batch_and_the_global_rng_is_untouched():
    from torchvision.transforms.v2 import functional as F
    from mtmm.data.augment import Augment, sample_seed
    augment = Augment(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.05, seed=3)
    rows = torch.randint(0, 256, (12, 3, 21, 21), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    out = augment(rows, 18, [2] * 12, list(range(12)))
    assert torch.equal(torch.get_rng_state(), state)
    # the same samples alone, in another order, in another batch: the same pixels
    alone = [augment(rows[k:k + 1], 18, [2], [k]) for k in range(12)]
    assert torch.equal(torch.cat(alone), out)
    assert torch.equal(augment(rows.flip(0), 18, [2] * 12, list(range(11, -1, -1))), out.flip(0))
    # the batched flip and colour jitter are torchvision's, with the sample's own parameters and order
    adjust = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    for k in range(12):
        params = augment.draw(sample_seed(3, 2, k), 21, 21)
        expected = F.resized_crop(rows[k], *params["crop"], [18, 18], antialias=True)
        expected = F.horizontal_flip(expected) if params["flip"] else expected
        for n in params["order"]:
            expected = adjust[n](expected, params["factors"][n])
        assert torch.equal(out[k], expected)
    assert len({tuple(augment.draw(k, 21, 21)["crop"]) for k in range(20)}) > 10  # the crops do vary
