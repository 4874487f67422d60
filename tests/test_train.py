"""train(cfg) end to end on a tiny dataset, in-process: the run folder, checkpoints, determinism, evaluation."""

import json
import math
import os

import pytest
import torch

from mtmm.checkpoint import load_checkpoint
from mtmm.errors import UserError
from mtmm.eval import evaluate_checkpoint
from mtmm.train import train


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_folder_contents(make_cfg, tmp_path):
    run = tmp_path / "run"
    value = train(make_cfg("tasks=img+txt+match"), run_dir=run)
    for name in ("config.yaml", "train.log", "metrics.jsonl", "summary.json", "checkpoints/last.pt",
                 "checkpoints/best.pt", "tokenizer/tokenizer.json"):
        assert (run / name).is_file(), name
    assert "epoch 2/2" in (run / "train.log").read_text()

    records = read_jsonl(run / "metrics.jsonl")
    train_records = [r for r in records if r["split"] == "train"]
    val_records = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train_records] == list(range(1, 7))  # 96 samples / batch 32 * 2 epochs, log_every=1
    assert train_records[0]["weights"] == {"img": 1.0, "txt": 1.0, "match": 1.0}
    assert set(train_records[0]) >= {"step", "epoch", "loss", "img", "txt", "match", "lr"}
    assert [r["epoch"] for r in val_records] == [1, 2]
    assert set(val_records[0]["match"]) == {"accuracy", "f1", "auroc", "loss", "count", "ece", "brier"}
    assert set(val_records[0]["img"]) == {"accuracy", "macro_f1", "loss", "count", "ece", "brier"}
    assert val_records[0]["img"]["count"] == 32
    assert sorted(r.get("checkpoint") for r in records if r["split"] == "test") == ["best", "last"]

    summary = json.loads((run / "summary.json").read_text())
    best_epoch = max(val_records, key=lambda r: r["mean"]["accuracy"])["epoch"]
    assert summary["best"]["epoch"] == best_epoch
    assert value == summary["monitor_value"] == max(r["mean"]["accuracy"] for r in val_records)
    assert {task: summary["final"]["val"][task] for task in ("img", "txt", "match", "mean")} == \
        {task: val_records[-1][task] for task in ("img", "txt", "match", "mean")}
    assert set(summary["best"]["test"]) == {"img", "txt", "match", "mean"}
    assert summary["checkpoints"]["best"].endswith("checkpoints/best.pt") and summary["wall_time_s"] > 0


def test_checkpoint_is_plain_data_with_everything_needed(make_cfg, tmp_path):
    train(make_cfg(), run_dir=tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["format"] == "mtmm-checkpoint" and state["version"] == 1
    assert {"config", "model", "optimizer", "scheduler", "epoch", "step", "rng", "metrics", "data"} <= set(state)
    assert state["epoch"] == 2 and state["step"] == 6
    assert "tokenizer.json" in state["data"]["tokenizer_files"]
    assert state["data"]["classes"]["txt"] == ["negative", "neutral", "positive"]
    assert "fusion:" in state["config"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))  # no temp file left from the atomic writes


def test_eval_reproduces_the_metrics_recorded_at_training_time(make_cfg, tmp_path):
    train(make_cfg("tasks=img+txt+match", "fusion=middle"), run_dir=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    best = tmp_path / "run" / "checkpoints" / "best.pt"

    test_metrics = evaluate_checkpoint(best, split="test", run_dir=tmp_path / "eval", device="cpu")
    assert json.loads(json.dumps(test_metrics)) == summary["best"]["test"]
    val_metrics = evaluate_checkpoint(best, split="val", run_dir=tmp_path / "eval-val", device="cpu")
    assert json.loads(json.dumps(val_metrics)) == summary["best"]["val"]

    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["metrics"] == summary["best"]["test"] and written["split"] == "test"
    predictions = read_jsonl(tmp_path / "eval" / "predictions.jsonl")
    assert len(predictions) == 32 and predictions[0]["id"].startswith("test-")
    first = predictions[0]
    assert first["match"]["target"] in ("different", "same") and len(first["img"]["probabilities"]) == 6
    assert abs(sum(first["txt"]["probabilities"]) - 1) < 1e-4
    accuracy = sum(p["img"]["prediction"] == p["img"]["target"] for p in predictions) / len(predictions)
    assert accuracy == pytest.approx(summary["best"]["test"]["img"]["accuracy"])


def test_same_seed_same_metrics_other_seed_other_metrics(make_cfg, tmp_path):
    first = train(make_cfg("trainer.epochs=1"), run_dir=tmp_path / "a")
    again = train(make_cfg("trainer.epochs=1"), run_dir=tmp_path / "b")
    other = train(make_cfg("trainer.epochs=1", "seed=1"), run_dir=tmp_path / "c")
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in "abc"]
    assert first == again and summaries[0]["best"]["test"] == summaries[1]["best"]["test"]
    assert summaries[0]["best"]["test"] != summaries[2]["best"]["test"]
    assert math.isfinite(other)


def test_never_overwrites_an_earlier_run(make_cfg, tmp_path):
    train(make_cfg("trainer.epochs=1"), run_dir=tmp_path)
    before = (tmp_path / "checkpoints" / "best.pt").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        train(make_cfg("trainer.epochs=1"), run_dir=tmp_path)
    assert (tmp_path / "checkpoints" / "best.pt").read_bytes() == before


@pytest.mark.parametrize("fusion", ["early", "late", "middle"])
@pytest.mark.parametrize("modalities", [("encoder/text=none",), ("encoder/image=none",), ()])
def test_every_fusion_trains_with_one_or_both_modalities(make_cfg, tmp_path, fusion, modalities):
    value = train(make_cfg(f"fusion={fusion}", "trainer.epochs=1", *modalities), run_dir=tmp_path)
    assert 0.0 <= value <= 1.0
    state = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    has_text = any(key.startswith("encoders.text.") for key in state["model"])
    has_image = any(key.startswith("encoders.image.") for key in state["model"])
    assert (has_text, has_image) == ("encoder/text=none" not in modalities, "encoder/image=none" not in modalities)


def test_bad_monitor_is_refused_before_training(make_cfg, tmp_path):
    with pytest.raises(UserError, match="val/mean/accuracy"):
        train(make_cfg("trainer.monitor=val/img/auroc"), run_dir=tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_monitor_by_min_loss(make_cfg, tmp_path):
    value = train(make_cfg("trainer.monitor=val/txt/loss", "trainer.monitor_mode=min"), run_dir=tmp_path)
    losses = [r["txt"]["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "val"]
    assert value == min(losses)


def test_task_weight_zero_leaves_that_head_untrained(make_cfg, tmp_path):
    train(make_cfg("tasks.img.weight=0", "trainer.epochs=1", "optim.weight_decay=0"), run_dir=tmp_path)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records[0]["weights"] == {"img": 0.0, "txt": 1.0}
    # With lambda_img = 0 no gradient reaches the img head, so AdamW leaves its weights as initialised.
    from mtmm.build import build_model
    from mtmm.data.build import build_data
    cfg = make_cfg("tasks.img.weight=0")
    torch.manual_seed(cfg.seed)
    data = build_data(cfg, splits=("train",))
    initial = build_model(cfg, data.tasks, data.tokenizer).state_dict()
    trained = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    assert torch.equal(trained["heads.img.3.weight"], initial["heads.img.3.weight"])
    assert not torch.equal(trained["heads.txt.3.weight"], initial["heads.txt.3.weight"])


def test_bf16_autocast_on_cpu(make_cfg, tmp_path):
    value = train(make_cfg("device.precision=bf16", "trainer.epochs=1"), run_dir=tmp_path)
    assert math.isfinite(value)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in records if r["split"] == "train")


@pytest.mark.slow
def test_learns_the_text_task(make_cfg, tmp_path):
    """Sentiment is decidable from the caption: a few epochs on 600 samples must get it nearly right."""
    train(make_cfg("tasks=txt", "data.source.train=600", "data.source.val=100", "data.source.test=100",
                   "trainer.epochs=4", "trainer.log_every=50"), run_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best"]["test"]["txt"]["accuracy"] >= 0.9


@pytest.mark.parametrize("fusion", ["gated", "tensor", "lowrank", "film", "cross_attention"])
@pytest.mark.parametrize("mtl", ["hard", "mmoe", "cgc"])
def test_more_fusions_and_sharing_architectures_train(make_cfg, tmp_path, fusion, mtl):
    value = train(make_cfg(f"fusion={fusion}", f"mtl={mtl}", "tasks=img+txt+match", "trainer.epochs=1"),
                  run_dir=tmp_path)
    assert 0.0 <= value <= 1.0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["best"]["test"]) == {"img", "txt", "match", "mean"}


@pytest.mark.slow
def test_compiled_model_trains_and_saves_plain_checkpoints(make_cfg, tmp_path):
    """trainer.compile=true: torch.compile'd forward; checkpoints keep the plain module's keys, so eval loads them."""
    train(make_cfg("trainer.epochs=1"), run_dir=tmp_path / "plain")
    train(make_cfg("trainer.epochs=1", "trainer.compile=true"), run_dir=tmp_path / "compiled")
    plain = load_checkpoint(tmp_path / "plain" / "checkpoints" / "best.pt")["model"]
    compiled = load_checkpoint(tmp_path / "compiled" / "checkpoints" / "best.pt")["model"]
    assert plain.keys() == compiled.keys()
    summary = json.loads((tmp_path / "compiled" / "summary.json").read_text())
    metrics = evaluate_checkpoint(tmp_path / "compiled" / "checkpoints" / "best.pt", run_dir=tmp_path / "eval",
                                  device="cpu")
    assert metrics["img"]["accuracy"] == pytest.approx(summary["best"]["test"]["img"]["accuracy"], abs=1 / 32)
    assert math.isfinite(summary["best"]["test"]["mean"]["loss"])


def test_keep_best_per_task_writes_each_tasks_best_epoch_as_hard_links_where_states_match(make_cfg, tmp_path):
    train(make_cfg("tasks=img+txt", "trainer.epochs=3", "trainer.keep_best_per_task=true"), run_dir=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    checkpoints = tmp_path / "checkpoints"
    for task in ("img", "txt"):
        values = [r[task]["accuracy"] for r in val]
        best_epoch = values.index(max(values)) + 1  # the first epoch reaching the maximum
        entry = summary["best_per_task"][task]
        assert (entry["epoch"], entry["metric"], entry["value"]) == (best_epoch, "accuracy", max(values))
        assert entry["val"] == val[best_epoch - 1][task]
        state = torch.load(checkpoints / f"best-{task}.pt", weights_only=True)
        assert state["progress"]["epoch"] == best_epoch + 1 and state["metrics"]["val"][task] == entry["val"]
        assert entry["checkpoint"] == str(checkpoints / f"best-{task}.pt")
        for other in ("best", "last"):  # the same state is one file under several names
            other_state = torch.load(checkpoints / f"{other}.pt", weights_only=True)
            assert os.path.samefile(checkpoints / f"best-{task}.pt", checkpoints / f"{other}.pt") == (
                other_state["progress"] == state["progress"])


def test_keep_best_per_task_refuses_a_task_name_that_is_no_file_name(make_cfg, tmp_path):
    from omegaconf import open_dict
    cfg = make_cfg("tasks=img", "trainer.keep_best_per_task=true")
    with open_dict(cfg):
        cfg.tasks["../img"] = cfg.tasks.pop("img")  # a task file's key can hold what an override cannot
    with pytest.raises(UserError, match=r"task '\.\./img' needs a name of letters"):
        train(cfg, run_dir=tmp_path)
    assert not (tmp_path / "checkpoints").exists()
