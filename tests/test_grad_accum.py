"""trainer.grad_accum_steps: N micro-batches of B make the step one batch of N x B makes; an epoch's last, shorter
group still steps and the schedule counts optimizer steps; a stopped run resumes exactly; bad values are refused."""

import json
import math

import pytest
import torch

from mtmm.errors import UserError
from mtmm.loop import StopSignal
from mtmm.train import train

# No BatchNorm (no image encoder: SmallCNN and the torchvision models have it) and no dropout, so a batch of 32 and
# two micro-batches of 16 compute the same function of the same samples. Every shapes sample has both labels, so
# each micro-batch's per-sample mean halved adds up to the batch's mean.
EXACT = ["encoder/image=none", "encoder.text.dropout=0", "mtl.dropout=0", "encoder.text.hidden_size=32",
         "encoder.text.intermediate_size=64", "mtl.hidden=[32]"]
SMALL = ["encoder/image=none", "encoder.text.hidden_size=16", "encoder.text.intermediate_size=32", "mtl.hidden=[16]"]


def records(run_dir, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["split"] == split]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.mark.parametrize("loss", ["static", "pcgrad"])
def test_two_micro_batches_of_16_equal_one_batch_of_32(make_cfg, tmp_path, monkeypatch, loss):
    # 96 training samples: 3 full groups per epoch either way, 2 epochs -> 6 steps compared one by one. pcgrad on the
    # parameters sums each task's gradients over the micro-batches and combines them once: the same as one batch.
    # AdamW and clipping hide a gradient twice too large, so each step's gradient norm (before clipping) is compared.
    norms = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(parameters, max_norm, **options):
        norm = real_clip(parameters, max_norm, **options)
        norms.append(float(norm))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    train(make_cfg(*EXACT, f"loss={loss}", "data.batch_size=32"), tmp_path / "one")
    train(make_cfg(*EXACT, f"loss={loss}", "data.batch_size=16", "trainer.grad_accum_steps=2"), tmp_path / "accum")
    assert len(norms) == 12  # one per optimizer step, 6 in each run
    for a, b in zip(norms[:6], norms[6:]):
        assert math.isclose(a, b, rel_tol=1e-5), norms
    one, accum = records(tmp_path / "one", "train"), records(tmp_path / "accum", "train")
    assert [r["step"] for r in accum] == [r["step"] for r in one] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(one, accum):
        for key in ("loss", "lr"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-9), (key, a, b)
        for task in ("img", "txt"):
            assert math.isclose(a[task]["loss"], b[task]["loss"], rel_tol=1e-5), (task, a, b)
    for a, b in zip(records(tmp_path / "one", "val"), records(tmp_path / "accum", "val")):
        assert math.isclose(a["mean"]["loss"], b["mean"]["loss"], rel_tol=1e-5), (a, b)
    expected, got = weights(tmp_path / "one"), weights(tmp_path / "accum")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=1e-5, atol=1e-6), key


@pytest.mark.parametrize("loss", ["static", "pcgrad"])
def test_the_last_shorter_group_steps_and_the_schedule_counts_steps(make_cfg, tmp_path, loss):
    # 80 samples in batches of 16: 5 batches -> groups of 2, 2, 1 -> ceil(5 / 2) = 3 optimizer steps per epoch.
    cfg = make_cfg(*SMALL, f"loss={loss}", "data.source.train=80", "data.batch_size=16", "trainer.grad_accum_steps=2")
    train(cfg, tmp_path)
    train_records = records(tmp_path, "train")
    assert [(r["epoch"], r["step"]) for r in train_records] == [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5), (2, 6)]
    assert [r["step"] for r in records(tmp_path, "val")] == [3, 6]
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 6 and state["progress"]["epoch"] == 3 and state["progress"]["batch"] == 0
    # The cosine schedule spans 2 x 3 = 6 steps (int(10% of 6) = 0 warm-up steps) and reaches min_lr_ratio=0 on the
    # last one; counted in batches (10), or with floor division (4), it would be off that curve.
    peak = cfg.optim.lr
    for record in train_records:
        expected = peak * 0.5 * (1 + math.cos(math.pi * record["step"] / 6))
        assert math.isclose(record["lr"], expected, rel_tol=1e-6, abs_tol=1e-12), record
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["samples"]["train"] == 80


def test_a_stopped_run_resumes_exactly_with_accumulation(make_cfg, tmp_path):
    # Dropout on (model and modality): the RNG state must come back too; 5 batches per epoch, so the stop after the
    # first step leaves the epoch mid-way, between groups, and its last group is the short one.
    run = [*SMALL, "data.source.train=80", "data.batch_size=16", "trainer.grad_accum_steps=2",
           "trainer.checkpoint_every=1", "modality_dropout.text=0.3"]
    train(make_cfg(*run), tmp_path / "whole")
    calls = iter(range(1000))
    with pytest.MonkeyPatch.context() as patch, pytest.raises(UserError, match="stopped"):
        patch.setattr(StopSignal, "requested", lambda self: next(calls) == 0)  # after the first optimizer step
        train(make_cfg(*run), tmp_path / "part")
    stopped = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    assert stopped["step"] == 1 and stopped["progress"]["batch"] == 2  # one whole group of two micro-batches
    train(make_cfg(*run, f"resume={tmp_path / 'part'}"))
    whole, part = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("whole", "part"))
    assert part["final"] == whole["final"] and part["best"] == whole["best"]
    expected, got = weights(tmp_path / "whole"), weights(tmp_path / "part")
    assert expected.keys() == got.keys() and all(torch.equal(got[key], expected[key]) for key in expected)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rs]  # noqa: E731 - timing
    for split in ("train", "val"):
        assert strip(records(tmp_path / "part", split)) == strip(records(tmp_path / "whole", split))


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "two", "true"])
def test_bad_grad_accum_steps_is_one_line_naming_the_key(make_cfg, tmp_path, value):
    with pytest.raises(UserError) as error:
        train(make_cfg(*SMALL, "trainer.epochs=1", f"trainer.grad_accum_steps={value}"), tmp_path)
    message = str(error.value)
    assert message.startswith("trainer.grad_accum_steps=") and "whole number >= 1" in message
    assert "\n" not in message
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()
