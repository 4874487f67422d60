"""Per-task loss and output size, by task type."""

import torch
import torch.nn.functional as F

TASK_TYPES = ("multiclass", "binary", "multilabel", "regression")


def output_size(task_type: str, num_classes: int) -> int:
    """Binary and regression tasks predict one value; multiclass one logit per class, multilabel one per label."""
    return 1 if task_type in ("binary", "regression") else num_classes


def masked_task_loss(task_type: str, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean loss over the samples that have a label for this task; exactly 0 (with a graph) when none has.

    multiclass: cross-entropy; binary and multilabel: binary cross-entropy on logits (mean over labels too);
    regression: mean squared error on standardised targets."""
    if not mask.any():
        return logits.sum() * 0.0
    logits, targets = logits[mask].float(), targets[mask]
    if task_type == "binary":
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), targets.float())
    if task_type == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, targets.float())
    if task_type == "regression":
        return F.mse_loss(logits.squeeze(-1), targets.float())
    return F.cross_entropy(logits, targets)
