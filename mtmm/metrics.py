"""Evaluation metrics for multi-task training, in plain torch.

Conventions follow scikit-learn so numbers are comparable with the usual tools:

* ``macro_f1``: per-class F1 = 2TP / (2TP + FP + FN), averaged over the classes
  that occur in the targets *or* the predictions (sklearn's default label set,
  ``unique(y_true) | unique(y_pred)``). A class occurring only on one side
  contributes 0 (sklearn's ``zero_division=0``); a class absent from both is
  not counted at all.
* binary ``f1``: F1 of the positive class; 0.0 when there are no true and no
  predicted positives.
* ``auroc``: probability that a random positive scores above a random negative,
  ties counting 1/2 (Mann-Whitney U from average ranks, O(N log N)). NaN when the
  targets hold only one class, since it is undefined there (sklearn raises).
* multilabel ``micro_f1`` (over all label decisions; 0.0 when nothing is positive anywhere), ``macro_f1`` (mean of
  per-label F1 over *all* labels) and ``map`` (mean over *all* labels of the average precision, sklearn's step-wise
  definition: sum over distinct thresholds of (R_n - R_{n-1}) P_n); prediction = logit > 0. A label without a
  positive target counts 0 in both means, as in sklearn (f1_score and average_precision_score, average="macro",
  default zero_division) and torchmetrics: a label the batch cannot score drags the mean down rather than being
  left out, so the number is comparable across splits with different label coverage.
* regression ``mae``, ``rmse`` and ``r2`` (1 - SS_res / SS_tot). Constant targets (SS_tot = 0) follow sklearn's
  r2_score (force_finite=True): 1.0 when the predictions are exact, else 0.0 -- finite, so that means over tasks
  and best-epoch choice keep working; such an r2 says nothing about fit beyond "exact or not".
* Empty input (N == 0): every metric is NaN rather than an error.

Inputs may live on any device and in any float dtype (bf16/fp16 included); they
are moved to float32 on the CPU first. All results are plain Python floats.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtmm.tasks import TASK_TYPES
_NAN = float("nan")


def multiclass_metrics(logits: Tensor, targets: Tensor) -> dict[str, float]:
    """logits [N, C] float, targets [N] int64 -> {"accuracy", "macro_f1"}."""
    logits = logits.detach().to("cpu", torch.float32)
    targets = targets.detach().to("cpu", torch.int64).reshape(-1)
    if targets.numel() == 0:
        return {"accuracy": _NAN, "macro_f1": _NAN}
    preds = logits.argmax(dim=1)
    correct = preds == targets
    # Per-class counts; minlength keeps every column even if a class never shows.
    n = max(logits.shape[1], int(targets.max()) + 1)
    tp = torch.bincount(targets[correct], minlength=n).double()
    pred_count = torch.bincount(preds, minlength=n).double()
    true_count = torch.bincount(targets, minlength=n).double()
    denom = pred_count + true_count  # == 2TP + FP + FN
    present = denom > 0  # sklearn averages over labels in y_true | y_pred only
    f1 = 2 * tp[present] / denom[present]
    return {"accuracy": correct.double().mean().item(), "macro_f1": f1.mean().item()}


def _auroc(scores: Tensor, positive: Tensor) -> float:
    """Mann-Whitney AUROC with average ranks for ties; NaN if one class only."""
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return _NAN
    sorted_scores, order = torch.sort(scores)
    _, counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    # 1-based rank of each tie group = mean of the ranks it spans.
    ends = torch.cumsum(counts, 0).double()
    group_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty(scores.numel(), dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(group_rank, counts)
    u = ranks[positive].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def binary_metrics(logits: Tensor, targets: Tensor) -> dict[str, float]:
    """logits [N] or [N, 1] raw scores, targets [N] in {0, 1} -> {"accuracy", "f1", "auroc"}.

    The prediction is ``logit > 0`` (probability > 0.5).
    """
    scores = logits.detach().to("cpu", torch.float32).reshape(-1)
    positive = targets.detach().to("cpu").reshape(-1) != 0
    if positive.numel() == 0:
        return {"accuracy": _NAN, "f1": _NAN, "auroc": _NAN}
    preds = scores > 0
    tp = int((preds & positive).sum())
    denom = int(preds.sum()) + int(positive.sum())  # 2TP + FP + FN
    return {
        "accuracy": (preds == positive).double().mean().item(),
        "f1": 2 * tp / denom if denom else 0.0,
        "auroc": _auroc(scores, positive),
    }


def _average_precision(scores: Tensor, positive: Tensor) -> float:
    """Step-wise AP over distinct score thresholds (ties form one step), as sklearn computes it."""
    n_pos = int(positive.sum())
    if n_pos == 0:
        return _NAN
    sorted_scores, order = torch.sort(scores, descending=True)
    hits = positive[order].double()
    true_positives, seen = torch.cumsum(hits, 0), torch.arange(1, len(hits) + 1, dtype=torch.float64)
    last_of_group = torch.ones(len(hits), dtype=torch.bool)
    last_of_group[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    precision = (true_positives / seen)[last_of_group]
    recall = (true_positives / n_pos)[last_of_group]
    steps = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
    return float((steps * precision).sum())


def multilabel_metrics(logits: Tensor, targets: Tensor) -> dict[str, float]:
    """logits [N, L], targets [N, L] in {0, 1} -> {"micro_f1", "macro_f1", "map"}."""
    scores = logits.detach().to("cpu", torch.float32)
    positive = targets.detach().to("cpu") > 0.5
    if positive.shape[0] == 0:
        return {"micro_f1": _NAN, "macro_f1": _NAN, "map": _NAN}
    preds = scores > 0
    tp = (preds & positive).sum(0).double()
    denom = preds.sum(0).double() + positive.sum(0).double()  # 2TP + FP + FN per label
    micro = 2 * tp.sum() / denom.sum() if denom.sum() > 0 else torch.tensor(0.0)
    # A label with no positive target or prediction has F1 0/0, counted 0 (sklearn's zero_division=0).
    macro = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp)).mean()
    # A label with no positive target has AP 0 (sklearn; its recall is undefined).
    precisions = [_average_precision(scores[:, k], positive[:, k]) for k in range(scores.shape[1])]
    return {"micro_f1": float(micro), "macro_f1": float(macro),
            "map": sum(ap if ap == ap else 0.0 for ap in precisions) / len(precisions) if precisions else _NAN}


def regression_metrics(predictions: Tensor, targets: Tensor) -> dict[str, float]:
    """predictions [N] or [N, 1], targets [N] (in the same, original units) -> {"mae", "rmse", "r2"}."""
    predictions = predictions.detach().to("cpu", torch.float64).reshape(-1)
    targets = targets.detach().to("cpu", torch.float64).reshape(-1)
    if targets.numel() == 0:
        return {"mae": _NAN, "rmse": _NAN, "r2": _NAN}
    errors = predictions - targets
    total, residual = ((targets - targets.mean()) ** 2).sum(), errors.pow(2).sum()
    if total > 0:
        r2 = (1 - residual / total).item()
    else:  # constant targets: sklearn's force_finite convention
        r2 = 1.0 if residual == 0 else 0.0
    return {"mae": errors.abs().mean().item(), "rmse": errors.pow(2).mean().sqrt().item(), "r2": r2}


def task_metrics(task_type: str, logits: Tensor, targets: Tensor) -> dict[str, float]:
    """Dispatch on task_type (one of TASK_TYPES); anything else raises ValueError."""
    if task_type == "multiclass":
        return multiclass_metrics(logits, targets)
    if task_type == "binary":
        return binary_metrics(logits, targets)
    if task_type == "multilabel":
        return multilabel_metrics(logits, targets)
    if task_type == "regression":
        return regression_metrics(logits, targets)
    raise ValueError(f"unknown task type {task_type!r}; expected one of {', '.join(TASK_TYPES)}")


def mean_over_tasks(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean over tasks of each metric name present in every task.

    Names not shared by all tasks (e.g. "auroc" when one task is multiclass) are
    left out, so the average never silently covers a subset of tasks.
    Empty input gives an empty dict. NaN values propagate.
    """
    if not per_task:
        return {}
    tasks = list(per_task.values())
    shared = [name for name in tasks[0] if all(name in t for t in tasks[1:])]
    return {name: sum(t[name] for t in tasks) / len(tasks) for name in shared}
