"""Gradient conflict between tasks: measured right, tallied into summary.json, and logging it changes nothing."""

import json

import pytest
import torch
from torch import nn

from mtmm.conflict import describe, measure, summarise, tally
from mtmm.train import train


class Toy(nn.Module):
    """A shared linear layer and one head per task, named as MultiTaskModel names them."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(3, 2, bias=False)
        self.heads = nn.ModuleDict({"a": nn.Linear(2, 1), "b": nn.Linear(2, 1), "c": nn.Linear(2, 1)})


def test_norms_and_cosines_are_those_of_the_per_task_gradients_on_the_shared_parameters():
    torch.manual_seed(0)
    toy, x = Toy(), torch.randn(5, 3)
    h = toy.trunk(x)
    losses = {"a": toy.heads["a"](h).sum(), "b": -toy.heads["a"](h).sum() * 3, "c": toy.heads["c"](h).pow(2).mean()}
    measured = measure(losses, toy)
    expected = {task: torch.autograd.grad(loss, [toy.trunk.weight], retain_graph=True)[0].flatten().double()
                for task, loss in losses.items()}
    for task, g in expected.items():
        assert measured["norms"][task] == pytest.approx(float(g.norm()), rel=1e-12)
    assert measured["cosine"]["a~b"] == pytest.approx(-1.0, abs=1e-12)  # b is -3x a: exactly opposite
    cosine_ac = float(expected["a"] @ expected["c"] / (expected["a"].norm() * expected["c"].norm()))
    assert measured["cosine"]["a~c"] == pytest.approx(cosine_ac, rel=1e-12)
    # A task without a label in the batch (loss exactly 0) is not a direction: it is left out.
    unlabelled = measure({**losses, "c": toy.heads["c"](h).sum() * 0.0}, toy)
    assert set(unlabelled["norms"]) == {"a", "b"} and set(unlabelled["cosine"]) == {"a~b"}


def test_tallies_say_how_often_each_pair_conflicts():
    totals = {}
    for cosine in (-0.5, 0.2, -0.1, 0.9):
        tally(totals, {"norms": {"a": 1.0, "b": 4.0}, "cosine": {"a~b": cosine}})
    summary = summarise(totals)["a~b"]
    assert summary == {"logged_steps": 4, "conflict_share": 0.5, "mean_cosine": pytest.approx(0.125),
                       "mean_norm_ratio": 4.0}
    assert describe({"a~b": summary})[0].startswith("a and b fight over the shared layers: their gradients conflict "
                                                    "in 50% of 4 logged steps")


@pytest.mark.slow
def test_logged_in_the_loop_tallied_in_the_summary_and_training_unchanged(make_cfg, tmp_path):
    common = ["tasks=img+txt+match", "trainer.epochs=1"]
    train(make_cfg(*common), run_dir=tmp_path / "plain")
    train(make_cfg(*common, "trainer.log_conflict_every=2"), run_dir=tmp_path / "logged")
    records = [json.loads(line) for line in (tmp_path / "logged" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["split"] == "conflict"]
    assert [r["step"] for r in logged] == [2]  # 3 steps in the epoch, every second logged
    assert set(logged[0]["cosine"]) == {"img~txt", "img~match", "txt~match"}
    summary = json.loads((tmp_path / "logged" / "summary.json").read_text())["gradient_conflict"]
    for pair, cosine in logged[0]["cosine"].items():
        assert summary[pair]["logged_steps"] == 1 and summary[pair]["conflict_share"] == float(cosine < 0)
    plain = torch.load(tmp_path / "plain" / "checkpoints" / "last.pt", weights_only=True)["model"]
    with_log = torch.load(tmp_path / "logged" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(plain[key], with_log[key]) for key in plain)  # measuring changes nothing
    plain_records = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rs if r["split"] != "conflict"]  # noqa: E731
    assert strip(records) == strip(plain_records)
