"""Data sources at scale: data=hf (a `datasets` folder, Parquet) and data=webdataset (tar shards), on tiny data
made here: training, evaluation from the checkpoint alone, exact resumption, the shard split across ranks and
workers (every sample once per epoch), two gloo processes, and bad rows under data.on_bad_sample."""

import io
import json
import random

import datasets
import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_module
from PIL import Image

from mtmm.data.build import build_data, build_loader
from mtmm.errors import UserError
from mtmm.eval import evaluate_checkpoint
import mtmm.train as train_module
from mtmm.data.vocab import Streamed
from mtmm.train import train

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 40, 230)}
FAST = ["trainer.epochs=2", "trainer.progress=false", "device=cpu", "data.batch_size=8", "data.eval_batch_size=16",
        "data.image_size=16", "data.num_workers=0", "encoder.text.hidden_size=32", "encoder.text.intermediate_size=64",
        "tasks=none", "+tasks.colour={type: multiclass, target: colour, weight: 1.0, head_hidden: [16], "
                      "metrics: [accuracy]}"]


def config(tmp_path, *overrides):
    with initialize_config_module("mtmm.conf", version_base="1.3"):
        return compose("train", overrides=[*FAST, f"data.source.cache_dir={tmp_path / 'cache'}", *overrides])


def png(colour: str, size: int = 20) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), COLOURS[colour]).save(buffer, format="PNG")
    return buffer.getvalue()


def samples(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        colour = rng.choice(sorted(COLOURS))
        rows.append({"id": f"s{i}", "picture": png(colour), "caption": f"a {colour} picture", "colour": colour})
    return rows


def saved_dataset(folder, counts=(48, 16, 16), bad: dict | None = None):
    """A DatasetDict with train/validation/test and the Image feature, written with save_to_disk; `bad`: training
    row -> cells to write instead."""
    features = datasets.Features({"id": datasets.Value("string"), "picture": datasets.Image(),
                                  "caption": datasets.Value("string"), "colour": datasets.Value("string")})
    parts = {}
    for seed, (split, count) in enumerate(zip(("train", "validation", "test"), counts)):
        rows = samples(count, seed)
        for row, cells in (bad or {}).items() if split == "train" else ():
            rows[row].update(cells)
        parts[split] = datasets.Dataset.from_dict(
            {key: [{"bytes": r[key], "path": None} if key == "picture" else r[key] for r in rows] for key in rows[0]},
            features=features)
    datasets.DatasetDict(parts).save_to_disk(str(folder))
    return folder


HF = ["data=hf", "data.source.columns.image=picture", "data.source.columns.text=caption"]


def shards(folder, split: str, count: int, per_shard: int, seed: int = 0, bad: dict | None = None):
    """`count` samples in shards of `per_shard` ({key}.png + {key}.json), written with webdataset.TarWriter;
    `bad`: key -> member -> bytes to write instead."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = samples(count, seed)
    for shard in range(-(-count // per_shard)):
        with wds.TarWriter(str(folder / f"{split}-{shard:03d}.tar")) as sink:
            for i in range(shard * per_shard, min(count, (shard + 1) * per_shard)):
                key = f"{split}{i:05d}"
                sample = {"__key__": key, "png": rows[i]["picture"],
                          "json": json.dumps({"caption": rows[i]["caption"], "colour": rows[i]["colour"],
                                              "id": rows[i]["id"]}).encode()}
                sample.update((bad or {}).get(key, {}))
                sink.write(sample)
    return folder


def wds_overrides(folder):
    return ["data=webdataset", f"data.source.train={folder}/train-*.tar", f"data.source.val={folder}/val-*.tar",
            f"data.source.test={folder}/test-*.tar", "data.source.columns.text=caption"]


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_hf_learns_labels_in_one_pass_and_caches_them(tmp_path, monkeypatch):
    saved_dataset(tmp_path / "ds")
    cfg = config(tmp_path, *HF, f"data.source.path={tmp_path / 'ds'}")
    first = build_data(cfg)
    monkeypatch.setattr(Streamed, "__iter__", lambda self: pytest.fail("a second pass instead of the cache"))
    second = build_data(cfg)
    assert first.tasks == second.tasks and first.tasks[0].classes == ("blue", "green", "red")
    assert list((tmp_path / "cache" / "learnt").glob("*.json"))
    assert first.tokenizer.get_vocab() == second.tokenizer.get_vocab()


def test_parquet_file_split_at_random_or_by_column_trains(tmp_path):
    rows = samples(40)
    for i, row in enumerate(rows):
        row["part"] = ["train", "train", "validation", "test"][i % 4]
    datasets.Dataset.from_dict({key: [r[key] for r in rows] for key in rows[0]}).to_parquet(str(tmp_path / "d.parquet"))
    data = build_data(config(tmp_path, *HF, f"data.source.path={tmp_path / 'd.parquet'}",
                             "data.source.split_column=part"))
    assert {split: len(dataset) for split, dataset in data.datasets.items()} == {"train": 20, "val": 10, "test": 10}
    train(config(tmp_path, *HF, f"data.source.path={tmp_path / 'd.parquet'}", "trainer.epochs=1"),
          run_dir=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["samples"] == {"train": 32, "val": 4, "test": 4}


def test_hf_bad_rows_are_named_or_skipped(tmp_path):
    saved_dataset(tmp_path / "bad", bad={40: {"picture": b"not an image"}, 41: {"colour": "purple"}})
    overrides = [*HF, f"data.source.path={tmp_path / 'bad'}", "trainer.epochs=1",
                 "+tasks.colour.classes=[blue,green,red]"]
    with pytest.raises(UserError, match=r"bad \(train\), row 4[01], column '(image|colour)'"):  # whichever comes first
        train(config(tmp_path, *overrides), run_dir=tmp_path / "run")
    strict = build_data(config(tmp_path, *overrides)).datasets["train"]
    with pytest.raises(UserError, match=r"row 40, column 'image': cannot read image the image bytes"):
        strict.__getitems__([40])
    cfg = config(tmp_path, *overrides, "data.on_bad_sample=skip")
    data = build_data(cfg)
    batch = data.datasets["train"].__getitems__([39, 40, 41])
    assert batch["target_mask"]["colour"].tolist() == [True, False, False]  # skipped: adds nothing to the loss
    assert batch["present"]["image"].tolist() == [True, False, False] and data.datasets["train"].skipped == 2
    with pytest.raises(UserError, match=r"row 41, column 'colour': label 'purple' of task 'colour' is not one"):
        strict.__getitems__([41])
    train(cfg, run_dir=tmp_path / "run2")


def test_hf_missing_column_lists_the_columns(tmp_path):
    saved_dataset(tmp_path / "ds")
    with pytest.raises(UserError, match=r"no column 'text' .*'caption'"):
        build_data(config(tmp_path, "data=hf", "data.source.columns.image=picture",
                          f"data.source.path={tmp_path / 'ds'}"))


def stopped_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, overrides, steps_per_epoch):
    """Train 2 epochs; train again, stopped after step steps_per_epoch + 1 (as SIGTERM stops a run) and resumed:
    the same losses step by step. Returns the uninterrupted run's folder."""
    overrides = [*overrides, "trainer.checkpoint_every=1"]
    train(config(tmp_path, *overrides), run_dir=tmp_path / "full")
    steps = [r for r in records(tmp_path / "full") if r["split"] == "train"]
    assert len(steps) == 2 * steps_per_epoch  # a fixed number of steps per epoch
    original = train_module.fit

    def fit_stopping(run, metrics_log, save, progress, stop_requested=None):
        asked = iter(range(1000))  # asked after each step and at each epoch end
        return original(run, metrics_log, save, progress, lambda: next(asked) >= steps_per_epoch + 1)

    monkeypatch.setattr(train_module, "fit", fit_stopping)
    with pytest.raises(UserError, match="stopped"):
        train(config(tmp_path, *overrides), run_dir=tmp_path / "cut")
    monkeypatch.setattr(train_module, "fit", original)
    resume = f"resume={tmp_path / 'cut'}"
    train(config(tmp_path, *overrides, resume), overrides=[resume])
    assert "resumed at epoch 2, batch 1" in (tmp_path / "cut" / "train.log").read_text()
    resumed = [r for r in records(tmp_path / "cut") if r["split"] == "train"]
    assert [r["step"] for r in resumed] == [r["step"] for r in steps]
    for a, b in zip(steps, resumed):
        assert a["loss"] == b["loss"], (a, b)
    return tmp_path / "full"


def test_hf_saved_dataset_trains_resumes_exactly_and_evaluates(tmp_path, monkeypatch):
    saved_dataset(tmp_path / "ds", counts=(24, 8, 16))
    full = stopped_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, [*HF, f"data.source.path={tmp_path / 'ds'}"],
                                                    3)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["samples"] == {"train": 24, "val": 8, "test": 16}  # the DatasetDict's splits, by name
    assert summary["labelled_samples"]["train"] == {"colour": 24}
    metrics = evaluate_checkpoint(full / "checkpoints" / "best.pt", run_dir=tmp_path / "eval", device="cpu",
                                  cache_dir=tmp_path / "evalcache")
    assert metrics["colour"]["count"] == 16
    assert metrics["colour"]["accuracy"] == summary["best"]["test"]["colour"]["accuracy"]
    ids = [json.loads(line)["id"] for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert ids == [f"s{i}" for i in range(16)]


def test_webdataset_trains_evaluates_and_resumes_exactly(tmp_path, monkeypatch):
    folder = tmp_path / "shards"
    shards(folder, "train", 24, 7)
    shards(folder, "val", 8, 8, seed=1)
    shards(folder, "test", 16, 8, seed=2)
    full = stopped_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, wds_overrides(folder), 3)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["samples"] == {"train": 24, "val": 8, "test": 16}
    metrics = evaluate_checkpoint(full / "checkpoints" / "best.pt", run_dir=tmp_path / "eval",
                                  device="cpu", cache_dir=tmp_path / "evalcache")
    assert metrics["colour"]["count"] == 16
    ids = [json.loads(line)["id"] for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert ids == [f"s{i}" for i in range(16)]  # file order, ids read back from the shards


@pytest.mark.parametrize("world_size, workers", [(1, 2), (2, 1), (3, 0)])
def test_webdataset_ranks_and_workers_see_every_sample_once_per_epoch(tmp_path, world_size, workers):
    folder = tmp_path / "shards"
    shards(folder, "train", 48, 7)  # 7 shards of 7 and one of 6: shares cut through shards
    shards(folder, "val", 8, 8, seed=1)
    shards(folder, "test", 8, 8, seed=2)
    cfg = config(tmp_path, *wds_overrides(folder), "data.batch_size=6", f"data.num_workers={workers}")
    data = build_data(cfg)
    for epoch in (1, 2):
        seen, steps = [], set()
        for rank in range(world_size):
            loader = build_loader(cfg, data, "train", seed=0, rank=rank, world_size=world_size)
            loader.sampler.set_epoch(epoch)
            batches = [batch["index"].tolist() for batch in loader]
            steps.add(len(batches))
            seen += [i for batch in batches for i in batch]
        assert len(steps) == 1  # every rank takes the same number of steps
        assert sorted(seen) == list(range(48)), (epoch, sorted(seen))  # each sample once
    orders = []
    for epoch in (1, 2):
        loader = build_loader(cfg, data, "train", seed=0)
        loader.sampler.set_epoch(epoch)
        orders.append([batch["index"].tolist() for batch in loader])
    assert orders[0] != orders[1]  # shards in a new order each epoch


def test_webdataset_batches_do_not_depend_on_the_workers_and_resume_mid_epoch(tmp_path):
    folder = tmp_path / "shards"
    shards(folder, "train", 30, 7)
    shards(folder, "val", 8, 8, seed=1)
    shards(folder, "test", 8, 8, seed=2)
    runs = {}
    for workers in (0, 2):
        cfg = config(tmp_path, *wds_overrides(folder), f"data.num_workers={workers}")
        loader = build_loader(cfg, build_data(cfg), "train", seed=3)
        loader.sampler.set_epoch(2)
        runs[workers] = [batch for batch in loader]
        loader.sampler.set_epoch(2, start=2 * 8)
        assert len(loader) == 2
        rest = list(loader)
        assert [b["index"].tolist() for b in rest] == [b["index"].tolist() for b in runs[workers][2:]]
        assert torch.equal(rest[0]["image"], runs[workers][2]["image"])
    assert [b["index"].tolist() for b in runs[0]] == [b["index"].tolist() for b in runs[2]]


@pytest.mark.slow
def test_webdataset_two_gloo_processes_train_over_the_shards(tmp_path):
    folder = tmp_path / "shards"
    shards(folder, "train", 32, 8)
    shards(folder, "val", 8, 8, seed=1)
    shards(folder, "test", 8, 8, seed=2)
    train(config(tmp_path, *wds_overrides(folder), "device.nproc_per_node=2", "trainer.epochs=1"),
          run_dir=tmp_path / "two")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["samples"]["train"] == 32
    assert len([r for r in records(tmp_path / "two") if r["split"] == "train"]) == 4  # 32 / global batch 8
    assert summary["best"]["test"]["colour"]["count"] == 8  # both ranks' halves, gathered


def test_webdataset_bad_sample_names_shard_key_and_column(tmp_path):
    folder = tmp_path / "shards"
    shards(folder, "train", 24, 8, bad={"train00013": {"png": b"broken"}, "train00020": {"json": b"{not json"}})
    shards(folder, "val", 8, 8, seed=1)
    shards(folder, "test", 8, 8, seed=2)
    cfg = config(tmp_path, *wds_overrides(folder), "trainer.epochs=1")
    with pytest.raises(UserError, match=r"train-001\.tar, key train00013, column 'image': cannot read image"):
        train(cfg, run_dir=tmp_path / "run")
    cfg = config(tmp_path, *wds_overrides(folder), "trainer.epochs=1", "data.on_bad_sample=skip")
    train(cfg, run_dir=tmp_path / "run2")
    assert "skipping bad samples" in (tmp_path / "run2" / "train.log").read_text()


def test_webdataset_gzipped_or_missing_shards_are_one_line(tmp_path):
    with pytest.raises(UserError, match="shard .*nothing.tar does not exist"):
        build_data(config(tmp_path, "data=webdataset", f"data.source.train={tmp_path}/nothing.tar"))
    (tmp_path / "x.tar").write_bytes(b"\x1f\x8b" + b"0" * 600)
    with pytest.raises(UserError, match="not an uncompressed tar"):
        build_data(config(tmp_path, "data=webdataset", f"data.source.train={tmp_path}/x.tar",
                          f"data.source.val={tmp_path}/x.tar", f"data.source.test={tmp_path}/x.tar"))
