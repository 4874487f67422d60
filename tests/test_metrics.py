import math

import pytest
import torch

from mtmm.metrics import multilabel_metrics, regression_metrics, binary_metrics, mean_over_tasks, multiclass_metrics, task_metrics


def one_hot_logits(preds: list[int], num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(preds), num_classes).float() * 3 - 1


def brute_auroc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    pos, neg = scores[targets == 1], scores[targets == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).double().sum() + 0.5 * (diff == 0).double().sum()).item() / diff.numel()


def test_multiclass_hand_example_never_predicted_and_absent_class():
    # C=4. class 0: TP1 P3 T2 -> 2/5; class 1: TP2 P3 T2 -> 4/5; class 2 never
    # predicted -> 0; class 3 absent from both -> not averaged (else 0.3).
    out = multiclass_metrics(one_hot_logits([0, 1, 1, 1, 0, 0], 4), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["macro_f1"] == pytest.approx((0.4 + 0.8 + 0.0) / 3)


def test_multiclass_predicted_only_class_counts_as_zero():
    out = multiclass_metrics(one_hot_logits([0, 2], 3), torch.tensor([0, 1]))
    assert out == pytest.approx({"accuracy": 0.5, "macro_f1": 1 / 3})


def test_multiclass_perfect_and_returns_python_floats():
    out = multiclass_metrics(one_hot_logits([2, 0, 1], 5), torch.tensor([2, 0, 1]))
    assert out == {"accuracy": 1.0, "macro_f1": 1.0}
    assert all(type(v) is float for v in out.values())


def test_binary_hand_example():
    # Predictions (logit > 0, so 0.0 is negative): T F T F F T vs targets 1 1 0 0 1 0.
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 0.0, 1.0])
    targets = torch.tensor([1, 1, 0, 0, 1, 0])
    out = binary_metrics(logits, targets)
    assert out["accuracy"] == pytest.approx(2 / 6)
    assert out["f1"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 2))
    assert out["auroc"] == pytest.approx(5 / 9)  # pairs: 2>all three, -1>-3, 0>-3


def test_binary_f1_zero_when_no_positives_anywhere():
    out = binary_metrics(torch.tensor([-1.0, -2.0]), torch.tensor([0, 0]))
    assert out["f1"] == 0.0 and out["accuracy"] == 1.0 and math.isnan(out["auroc"])


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_brute_force_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.round(torch.randn(300, generator=g) * 10) / 10  # many ties
    targets = torch.randint(0, 2, (300,), generator=g)
    assert binary_metrics(scores, targets)["auroc"] == pytest.approx(brute_auroc(scores, targets), abs=1e-12)


def test_auroc_extremes_and_constant():
    targets = torch.tensor([0, 0, 1, 1, 1])
    scores = torch.tensor([-2.0, -1.0, 0.5, 1.0, 3.0])
    assert binary_metrics(scores, targets)["auroc"] == 1.0
    assert binary_metrics(-scores, targets)["auroc"] == 0.0
    assert binary_metrics(torch.zeros(5), targets)["auroc"] == 0.5


def test_auroc_nan_with_one_class_only():
    assert math.isnan(binary_metrics(torch.tensor([0.1, 2.0]), torch.tensor([1, 1]))["auroc"])


def test_binary_accepts_n_by_1_logits():
    logits = torch.tensor([[2.0], [-1.0], [0.5]])
    targets = torch.tensor([1, 0, 0])
    assert binary_metrics(logits, targets) == binary_metrics(logits.squeeze(1), targets)


def test_low_precision_logits_accepted():
    mc = multiclass_metrics(one_hot_logits([0, 1, 1], 2).bfloat16(), torch.tensor([0, 1, 0]))
    assert mc["accuracy"] == pytest.approx(2 / 3)
    scores = torch.tensor([-2.0, -1.0, 0.5, 1.0])
    for dtype in (torch.bfloat16, torch.float16):
        out = binary_metrics(scores.to(dtype), torch.tensor([0, 1, 0, 1]))
        assert out["auroc"] == pytest.approx(0.75) and type(out["auroc"]) is float


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_accepted():
    logits, targets = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1, 0, 1])
    assert binary_metrics(logits.cuda(), targets.cuda()) == binary_metrics(logits, targets)


def test_empty_input_gives_nan():
    mc = multiclass_metrics(torch.empty(0, 3), torch.empty(0, dtype=torch.int64))
    bn = binary_metrics(torch.empty(0), torch.empty(0, dtype=torch.int64))
    assert set(mc) == {"accuracy", "macro_f1"} and set(bn) == {"accuracy", "f1", "auroc"}
    assert all(math.isnan(v) for v in [*mc.values(), *bn.values()])


def test_task_metrics_dispatch_and_error():
    logits, targets = torch.tensor([1.0, -1.0]), torch.tensor([1, 0])
    assert task_metrics("binary", logits, targets) == binary_metrics(logits, targets)
    mc_logits = one_hot_logits([0, 1], 2)
    assert task_metrics("multiclass", mc_logits, targets) == multiclass_metrics(mc_logits, targets)
    with pytest.raises(ValueError, match=r"'ranking'.*multiclass.*binary.*multilabel.*regression"):
        task_metrics("ranking", logits, targets)


def test_mean_over_tasks_keeps_shared_names():
    per_task = {
        "a": {"accuracy": 0.5, "macro_f1": 0.4},
        "b": {"accuracy": 1.0, "f1": 1.0, "auroc": 0.9},
        "c": {"accuracy": 0.0, "macro_f1": 0.2},
    }
    assert mean_over_tasks(per_task) == pytest.approx({"accuracy": 0.5})
    assert mean_over_tasks({"a": per_task["a"], "c": per_task["c"]}) == pytest.approx(
        {"accuracy": 0.25, "macro_f1": 0.3}
    )
    assert mean_over_tasks({}) == {}


def brute_force_average_precision(scores, positive):
    """sklearn's definition written the slow way: for every distinct threshold, from high to low."""
    total, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        chosen = [p for s, p in zip(scores, positive) if s >= threshold]
        recall = sum(chosen) / sum(positive)
        total += (recall - previous_recall) * (sum(chosen) / len(chosen))
        previous_recall = recall
    return total


def test_multilabel_metrics_against_hand_and_brute_force():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-1.0, 1.0, -2.0], [1.0, 1.0, -1.0], [-3.0, -1.0, 3.0]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]])
    values = multilabel_metrics(logits, targets)
    # predictions: [1,0,1], [0,1,0], [1,1,0], [0,0,1]: TP 4, FP 2, FN 0 -> micro F1 = 8/10
    assert values["micro_f1"] == pytest.approx(0.8)
    # per label F1: label0 2TP/(2*2+0+0)=1, label1 2/(2+1)=2/3, label2 2/(2+1)=2/3
    assert values["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40, 4), generator=generator).float()
    labels = torch.randint(0, 2, (40, 4), generator=generator)
    expected = [brute_force_average_precision(scores[:, k].tolist(), labels[:, k].tolist()) for k in range(4)]
    assert multilabel_metrics(scores, labels)["map"] == pytest.approx(sum(expected) / 4)


def test_multilabel_labels_without_positives_count_zero_as_in_sklearn():
    # Issue 11's example; sklearn 1.9.1 f1_score / average_precision_score(average="macro") give 0.5 and 0.5 (the
    # second label has no positive target: F1 0/0 -> 0, AP -> 0); mtmm used to skip it and report 1.0.
    values = multilabel_metrics(torch.tensor([[1.0, -1.0], [-1.0, -1.0]]), torch.tensor([[1, 0], [0, 0]]))
    assert values["macro_f1"] == pytest.approx(0.5) and values["map"] == pytest.approx(0.5)
    assert values["micro_f1"] == pytest.approx(1.0)
    nothing = multilabel_metrics(torch.tensor([[-1.0, -2.0]]), torch.tensor([[0, 0]]))
    assert nothing == {"micro_f1": 0.0, "macro_f1": 0.0, "map": 0.0}  # sklearn: 0.0 each


@pytest.mark.parametrize("seed", range(3))
def test_metrics_match_sklearn_on_random_data(seed):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(seed)
    logits = torch.round(torch.randn(60, 5, generator=g) * 4) / 4  # ties in the scores
    targets = (torch.rand(60, 5, generator=g) < torch.tensor([0.5, 0.1, 0.02, 0.0, 0.9])).long()  # a label never
    ours = multilabel_metrics(logits, targets)
    y, p = targets.numpy(), (logits > 0).long().numpy()
    assert ours["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(y, p, average="macro", zero_division=0))
    assert ours["micro_f1"] == pytest.approx(sklearn_metrics.f1_score(y, p, average="micro", zero_division=0))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No positive class found in y_true": the case being compared
        expected_map = sklearn_metrics.average_precision_score(y, logits.numpy(), average="macro")
    assert ours["map"] == pytest.approx(expected_map)
    classes = torch.randint(0, 4, (60,), generator=g)
    class_logits = torch.randn(60, 5, generator=g)
    assert multiclass_metrics(class_logits, classes)["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(
        classes.numpy(), class_logits.argmax(1).numpy(), average="macro", zero_division=0))
    predictions, values = torch.randn(30, generator=g), torch.randn(30, generator=g)
    assert regression_metrics(predictions, values)["r2"] == pytest.approx(
        sklearn_metrics.r2_score(values.numpy(), predictions.numpy()))
    for constant_predictions in (torch.full((4,), 2.0), torch.tensor([1.0, 2.0, 3.0, 2.0])):
        assert regression_metrics(constant_predictions, torch.full((4,), 2.0))["r2"] == \
            sklearn_metrics.r2_score(torch.full((4,), 2.0).numpy(), constant_predictions.numpy())


def test_regression_metrics():
    values = regression_metrics(torch.tensor([[1.0], [2.0], [5.0]]), torch.tensor([1.0, 3.0, 3.0]))
    assert values["mae"] == pytest.approx(1.0)
    assert values["rmse"] == pytest.approx(math.sqrt(5 / 3))
    # SS_res = 0 + 1 + 4 = 5, SS_tot = (1-7/3)^2 + 2 * (2/3)^2 = 24/9
    assert values["r2"] == pytest.approx(1 - 5 / (24 / 9))
    # Constant targets: sklearn's r2_score convention (force_finite=True), 1.0 when exact, else 0.0.
    assert regression_metrics(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0]))["r2"] == 0.0
    assert regression_metrics(torch.tensor([2.0, 2.0]), torch.tensor([2.0, 2.0]))["r2"] == 1.0
    assert all(math.isnan(v) for v in regression_metrics(torch.empty(0), torch.empty(0)).values())
