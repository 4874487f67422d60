"""The whole network: encoders -> fusion -> shared layers (hard sharing, MMoE or CGC) -> one head per task."""

import torch
from torch import nn

from mtmm.models.features import Features


class MultiTaskModel(nn.Module):
    """`modality_dropout` (modality -> probability) hides a modality from random training samples, so the model
    learns to cope when it is missing at test time."""

    def __init__(self, encoders: dict[str, nn.Module], fusion: nn.Module, shared: nn.Module,
                 heads: dict[str, nn.Module], modality_dropout: dict[str, float] | None = None):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        # Stands in for a modality a sample lacks (no image path, empty text): pooled features and a single token.
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(e.dim)) for m, e in encoders.items()})
        self.fusion = fusion
        self.shared = shared
        self.heads = nn.ModuleDict(heads)
        self.modality_dropout = {m: p for m, p in (modality_dropout or {}).items() if m in encoders and p > 0}

    def encode(self, batch: dict) -> dict[str, Features]:
        features = {}
        cached = batch.get("features", {})
        for modality, encoder in self.encoders.items():
            if modality in cached:
                # A frozen encoder's outputs, from the feature cache. Its final norm stays trainable, so the cache
                # holds the pooled features before it and the norm is applied here, as the encoder itself would.
                rows = cached[modality]
                encoded = Features(pooled=encoder.norm(rows["pooled"]), tokens=rows["tokens"], mask=rows["mask"])
            else:
                encoded = encoder(batch[modality])
            present = batch["present"][modality]
            if self.training and modality in self.modality_dropout:
                present = present & (torch.rand(present.shape, device=present.device) >= self.modality_dropout[modality])
            features[modality] = encoded if bool(present.all()) else self.mark_missing(encoded, present, modality)
        return features

    def mark_missing(self, features: Features, present: torch.Tensor, modality: str) -> Features:
        """Absent samples get the learnt 'missing' embedding as pooled features and as their one real token."""
        missing = self.missing[modality].to(features.pooled.dtype)
        absent = ~present
        pooled = torch.where(absent[:, None], missing, features.pooled)
        tokens = features.tokens.clone()
        tokens[absent] = 0
        tokens[absent, 0] = missing.to(tokens.dtype)
        mask = features.mask.clone()
        mask[absent] = False
        mask[absent, 0] = True
        return Features(pooled=pooled, tokens=tokens, mask=mask)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Batch dict (DESIGN.md) -> {task: logits [B, outputs]} (one output for binary and regression tasks)."""
        # Kept for methods that combine per-task gradients on the fused representation (loss.on=representation).
        self.fused = self.fusion(self.encode(batch))
        per_task = self.shared(self.fused)  # task -> its representation (hard sharing: the same for every task)
        return {task: head(per_task[task]) for task, head in self.heads.items()}

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The last linear layer before the heads (GradNorm balances gradient norms there)."""
        for part in (self.shared, self.fusion, *self.encoders.values()):
            linears = [m for m in part.modules() if isinstance(m, nn.Linear)]
            if linears:
                return list(linears[-1].parameters())
        return [p for p in self.parameters() if p.requires_grad][-1:]

    def train(self, mode: bool = True) -> "MultiTaskModel":
        super().train(mode)
        # A frozen encoder stays in eval mode: its BatchNorm statistics and dropout must not change either.
        for encoder in self.encoders.values():
            if encoder.frozen:
                encoder.eval()
        return self
