"""Static loss weighting, the seed's L = sum_k lambda_k L_k."""

import torch
from torch import nn


class StaticWeighting(nn.Module):
    """Fixed task weights lambda_k (tasks.<k>.weight). A module, like the adaptive methods, so that the loop treats
    every weighting the same way (mtmm/weighting/protocol.py)."""

    combines_gradients = False
    needs_shared_parameters = False

    def __init__(self, task_weights: dict[str, float]):
        super().__init__()
        self.task_weights = dict(task_weights)

    def forward(self, losses: dict[str, torch.Tensor], shared=None) -> torch.Tensor:
        return sum(self.task_weights[task] * loss for task, loss in losses.items())

    def weights(self) -> dict[str, float]:
        """The current weight of every task, logged to metrics.jsonl."""
        return dict(self.task_weights)

    def end_epoch(self) -> None:
        pass
