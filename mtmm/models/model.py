"""The whole network: encoders -> fusion -> shared layers -> one head per task."""

import torch
from torch import nn

from mtmm.models.features import Features


class MultiTaskModel(nn.Module):
    def __init__(self, encoders: dict[str, nn.Module], fusion: nn.Module, shared: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.shared = shared
        self.heads = nn.ModuleDict(heads)

    def encode(self, batch: dict) -> dict[str, Features]:
        return {modality: encoder(batch[modality]) for modality, encoder in self.encoders.items()}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Batch dict (DESIGN.md) -> {task: logits [B, outputs]} (one output for a binary task)."""
        shared = self.shared(self.fusion(self.encode(batch)))
        return {task: head(shared) for task, head in self.heads.items()}

    def train(self, mode: bool = True) -> "MultiTaskModel":
        super().train(mode)
        # A frozen encoder stays in eval mode: its BatchNorm statistics and dropout must not change either.
        for encoder in self.encoders.values():
            if encoder.frozen:
                encoder.eval()
        return self
