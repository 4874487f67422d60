"""How far a classifier's probabilities can be trusted, and one temperature per task that makes them fit better.

- ECE (expected calibration error, 15 equal-width bins of confidence): sum over bins of (samples in bin / N) x
  |accuracy in bin - mean confidence in bin|, with confidence the probability of the predicted class (multiclass,
  binary) or of each label's decision (multilabel, every label-sample pair one prediction).
- Brier score: mean over samples of sum over classes of (p_c - y_c)^2 (binary: both classes, so 0..2 like
  multiclass; multilabel: mean over labels of the binary score).
- Temperature scaling (Guo et al. 2017): logits / T with T > 0 fitted on the validation split to minimise the
  negative log-likelihood; argmax predictions (and so accuracy) do not change.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

BINS = 15


def probabilities(task_type: str, logits: Tensor) -> Tensor:
    """Class probabilities [N, C] (binary: [1 - p, p]; multilabel: per label, [N, L])."""
    if task_type == "multiclass":
        return torch.softmax(logits.float(), dim=-1)
    positive = torch.sigmoid(logits.float())
    return torch.stack([1 - positive[:, 0], positive[:, 0]], dim=1) if task_type == "binary" else positive


def calibration_metrics(task_type: str, logits: Tensor, targets: Tensor) -> dict[str, float]:
    """{"ece", "brier"} of a classification task's logits [N, C] (binary [N, 1]) against its targets."""
    if len(targets) == 0:
        return {"ece": float("nan"), "brier": float("nan")}
    p = probabilities(task_type, logits)
    if task_type == "multilabel":
        truth = targets.float()
        confidence = torch.where(p >= 0.5, p, 1 - p).reshape(-1)
        correct = ((p >= 0.5) == (truth >= 0.5)).float().reshape(-1)
        brier = ((p - truth) ** 2).mean()
    else:
        labels = targets.long().reshape(-1)
        confidence, predicted = p.max(dim=1)
        correct = (predicted == labels).float()
        brier = ((p - F.one_hot(labels, p.shape[1]).float()) ** 2).sum(dim=1).mean()
    return {"ece": expected_calibration_error(confidence, correct), "brier": float(brier)}


def expected_calibration_error(confidence: Tensor, correct: Tensor, bins: int = BINS) -> float:
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 falls into the first bin.
    index = (torch.ceil(confidence.double() * bins).long() - 1).clamp(0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            total += float(inside.double().mean() * (correct[inside].double().mean()
                                                       - confidence[inside].double().mean()).abs())
    return total


def negative_log_likelihood(task_type: str, logits: Tensor, targets: Tensor) -> Tensor:
    if task_type == "multiclass":
        return F.cross_entropy(logits, targets.long())
    if task_type == "binary":
        return F.binary_cross_entropy_with_logits(logits[:, 0], targets.float())
    return F.binary_cross_entropy_with_logits(logits, targets.float())


def fit_temperature(task_type: str, logits: Tensor, targets: Tensor) -> float:
    """The T > 0 minimising the NLL of logits / T (a 1-D convex problem in log T, solved by L-BFGS); 1.0 when there
    is nothing to fit on."""
    if len(targets) == 0:
        return 1.0
    logits, log_t = logits.detach().double(), torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = negative_log_likelihood(task_type, logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(1e-3, 1e3))
