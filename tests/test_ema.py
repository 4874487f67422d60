"""trainer.ema: a moving average of the weights, updated every optimizer step, validated, tested and saved as the
checkpoints' `model` (what mtmm-eval / predict / export use); the trained weights travel beside it for resuming."""

import json

import pytest
import torch

import mtmm.loop
from mtmm.errors import UserError
from mtmm.eval import evaluate_checkpoint
from mtmm.loop import StopSignal
from mtmm.train import train

DECAY = 0.6  # small: the average moves visibly within a few steps
RUN = ["trainer.epochs=2", "data.source.train=64", "trainer.checkpoint_every=1", f"trainer.ema={DECAY}"]


def floats(state: dict) -> dict:
    return {k: v for k, v in state.items() if v.is_floating_point()}


def test_the_average_is_the_ema_of_the_trained_weights_and_is_what_is_validated(make_cfg, tmp_path, monkeypatch):
    trained = []  # the model's weights after every optimizer step
    step = mtmm.loop.train_step

    def recording(run, batches, progress):
        out = step(run, batches, progress)
        trained.append({k: v.clone() for k, v in floats(run.model.state_dict()).items()})
        return out

    monkeypatch.setattr(mtmm.loop, "train_step", recording)
    train(make_cfg(*RUN), tmp_path / "run")
    expected = trained[0]
    for weights in trained[1:]:
        expected = {k: DECAY * expected[k] + (1 - DECAY) * weights[k] for k in expected}
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert last["ema_updates"] == len(trained) == last["step"]
    for name, value in floats(last["model"]).items():
        assert torch.allclose(value, expected[name], rtol=1e-5, atol=1e-6), name
    for name, value in floats(last["trained_model"]).items():
        assert torch.equal(value, trained[-1][name]), name
    assert any(not torch.equal(last["model"][k], last["trained_model"][k]) for k in expected)
    # mtmm-eval of best.pt scores the average: the test figures training recorded for best.pt
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    metrics = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", run_dir=tmp_path / "eval",
                                  device="cpu")
    assert metrics["img"]["accuracy"] == pytest.approx(summary["best"]["test"]["img"]["accuracy"])
    assert metrics["txt"]["loss"] == pytest.approx(summary["best"]["test"]["txt"]["loss"], rel=1e-5)


def test_a_stopped_run_with_ema_resumes_exactly(make_cfg, tmp_path):
    train(make_cfg(*RUN), tmp_path / "whole")
    calls = iter(range(1000))
    with pytest.MonkeyPatch.context() as patch, pytest.raises(UserError, match="stopped"):
        patch.setattr(StopSignal, "requested", lambda self: next(calls) == 0)  # after the first optimizer step
        train(make_cfg(*RUN), tmp_path / "part")
    train(make_cfg(*RUN, f"resume={tmp_path / 'part'}"))
    whole, part = (torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)
                   for name in ("whole", "part"))
    for entry in ("model", "trained_model"):
        assert all(torch.equal(part[entry][k], whole[entry][k]) for k in whole[entry]), entry
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("whole", "part")]
    assert summaries[0]["best"] == summaries[1]["best"]


@pytest.mark.parametrize("value", ["1.0", "-0.1", "true", "fast"])
def test_a_bad_decay_is_one_line_before_anything_is_built(make_cfg, tmp_path, value):
    with pytest.raises(UserError, match=r"^trainer.ema=.*use a decay in \[0, 1\)"):
        train(make_cfg("trainer.epochs=1", f"trainer.ema={value}"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
