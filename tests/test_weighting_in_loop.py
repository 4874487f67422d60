"""Loss weighting inside the real training loop: gradient plumbing, every method trains, weights are logged."""

import json
import math

import pytest
import torch

import mtmm.weighting.combine as combine
from mtmm.build import build_model
from mtmm.data.build import build_data, build_loader
from mtmm.tasks import masked_task_loss
from mtmm.train import train
from mtmm.weighting.combine import GradientCombination

GRADIENT_METHODS = ["pcgrad", "cagrad", "mgda", "imtl", "aligned_mtl", "nash_mtl", "upgrad", "graddrop", "gradvac",
                    "db_mtl", "fairgrad"]


def plain_sum(grads, losses):
    return grads.sum(0), torch.ones(len(grads), dtype=grads.dtype)


@pytest.mark.parametrize("on", ["parameters", "representation"])
def test_combination_plumbing_equals_plain_backward_when_the_method_is_the_sum(make_cfg, monkeypatch, on):
    """With a 'method' that just sums the rows, every parameter must get exactly the gradient of sum_k L_k."""
    monkeypatch.setitem(combine.METHODS, "sum", plain_sum)
    cfg = make_cfg("tasks=img+txt+match", "mtl=mmoe")
    data = build_data(cfg, splits=("train",))
    batch = next(iter(build_loader(cfg, data, "train")))
    torch.manual_seed(0)
    model = build_model(cfg, data.tasks, data.tokenizer).eval()  # eval: no dropout, both passes see the same graph
    types = {task.name: task.type for task in data.tasks}

    def losses():
        logits = model(batch)
        return {t: masked_task_loss(types[t], logits[t], batch["targets"][t], batch["target_mask"][t]) for t in types}

    sum(losses().values()).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    GradientCombination({t: 1.0 for t in types}, method="sum", on=on).backward(losses(), model)
    for name, parameter in model.named_parameters():
        if name in expected:
            assert torch.allclose(parameter.grad, expected[name], atol=1e-6), name


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_every_gradient_method_trains_and_logs_its_weights_every_step(make_cfg, tmp_path, method):
    train(make_cfg("tasks=img+txt+match", f"loss={method}", "trainer.epochs=1"), run_dir=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(set(r["weights"]) == {"img", "txt", "match"} for r in steps)
    assert all(math.isfinite(w) for r in steps for w in r["weights"].values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert math.isfinite(summary["best"]["test"]["mean"]["loss"])


def test_representation_mode_trains(make_cfg, tmp_path):
    train(make_cfg("loss=mgda", "loss.on=representation", "trainer.epochs=1"), run_dir=tmp_path)
    weights = [json.loads(line)["weights"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["split"] == "train"]
    assert all(abs(sum(w.values()) - 1) < 1e-4 for w in weights)  # MGDA's weights lie on the simplex


def test_fp16_with_gradient_methods_is_refused(make_cfg, tmp_path):
    from mtmm.errors import UserError
    with pytest.raises(UserError, match="bf16"):
        train(make_cfg("loss=pcgrad", "device.precision=fp16"), run_dir=tmp_path)
