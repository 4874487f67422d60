"""Calibration: ECE and Brier as their definitions compute them, temperature scaling that lowers the validation NLL,
and mtmm-eval calibrate=true carrying the temperatures to load_model."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import train_tiny
from mtmm import load_model
from mtmm.calibration import calibration_metrics, fit_temperature, negative_log_likelihood
from mtmm.eval import evaluate_checkpoint


def direct_ece(confidence: list[float], correct: list[bool], bins: int = 15) -> float:
    """ECE written out from its definition: equal-width bins (lo, hi], weights = share of samples."""
    total, n = 0.0, len(confidence)
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidence) if (lo < c <= hi) or (b == 0 and c == 0)]
        if members:
            accuracy = sum(correct[i] for i in members) / len(members)
            mean_confidence = sum(confidence[i] for i in members) / len(members)
            total += len(members) / n * abs(accuracy - mean_confidence)
    return total


@pytest.mark.parametrize("seed", range(5))
def test_ece_and_brier_match_their_definitions(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(200, 4, generator=generator) * (1 + seed)
    targets = torch.randint(0, 4, (200,), generator=generator)
    p = torch.softmax(logits, dim=1)
    confidence, predicted = p.max(dim=1)
    result = calibration_metrics("multiclass", logits, targets)
    assert result["ece"] == pytest.approx(direct_ece(confidence.tolist(), (predicted == targets).tolist()), abs=1e-9)
    assert result["brier"] == pytest.approx(float(((p - F.one_hot(targets, 4)) ** 2).sum(1).mean()), rel=1e-6)
    binary = calibration_metrics("binary", logits[:, :1], (targets > 1).long())
    q = torch.sigmoid(logits[:, 0])
    assert binary["brier"] == pytest.approx(float(2 * ((q - (targets > 1).float()) ** 2).mean()), rel=1e-6)


def test_a_perfectly_calibrated_and_an_overconfident_classifier():
    # Confidence 0.75 everywhere, right 3 times in 4: calibrated (ECE 0). Confidence ~1, same accuracy: ECE ~0.25.
    logits = torch.log(torch.tensor([[3.0, 1.0]] * 4))
    targets = torch.tensor([0, 0, 0, 1])
    assert calibration_metrics("multiclass", logits, targets)["ece"] == pytest.approx(0.0, abs=1e-7)
    assert calibration_metrics("multiclass", logits * 40, targets)["ece"] == pytest.approx(0.25, abs=1e-6)


def test_temperature_scaling_lowers_the_nll_of_an_overconfident_model_and_keeps_its_predictions():
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 3, (500,), generator=generator)
    logits = torch.randn(500, 3, generator=generator) + 1.5 * F.one_hot(targets, 3)  # informative, calibrated-ish
    confident = logits * 8  # the same ranking, far too sure
    t = fit_temperature("multiclass", confident, targets)
    assert t > 2
    before = negative_log_likelihood("multiclass", confident, targets)
    after = negative_log_likelihood("multiclass", confident / t, targets)
    assert after < before * 0.7
    for nearby in (t * 0.9, t * 1.1):  # a minimum: the NLL rises on both sides
        assert negative_log_likelihood("multiclass", confident / nearby, targets) > after
    assert torch.equal((confident / t).argmax(1), confident.argmax(1))


@pytest.mark.slow
def test_mtmm_eval_calibrate_writes_temperatures_that_load_model_applies(tmp_path):
    checkpoint = train_tiny(tmp_path, "trainer.epochs=1", "encoder/image=none", "tasks=txt",
                            "encoder.text.hidden_size=16", "encoder.text.intermediate_size=32")
    metrics = evaluate_checkpoint(checkpoint, run_dir=tmp_path / "eval", device="cpu", cache_dir=tmp_path,
                                  calibrate=True)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    temperature = saved["temperatures"]["txt"]
    assert temperature > 0 and {"ece", "brier"} <= set(metrics["txt"])
    raw, calibrated = load_model(checkpoint, device="cpu"), load_model(tmp_path / "eval" / "calibrated.pt", device="cpu")
    texts = ["a red circle", "a blue star"]
    logits = raw.logits(raw.batch(texts=texts))["txt"]
    expected = torch.softmax(logits / temperature, dim=-1)
    for row, result in enumerate(calibrated.predict(texts=texts)):
        assert result["txt"]["probabilities"] == pytest.approx(expected[row].tolist(), abs=1e-6)
