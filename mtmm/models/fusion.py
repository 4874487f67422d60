"""Fusion: the modalities' Features -> one vector h [B, dim] for the shared layers.

Every fusion takes `input_dims` (modality -> pooled width), works with any non-empty subset of modalities,
and exposes its output width as `.dim`. Modalities are always visited in sorted order, so parameters and
concatenations do not depend on dict order.
"""

import torch
from torch import nn

from mtmm.models.features import Features, masked_mean


class EarlyFusion(nn.Module):
    """Concatenate the modalities' pooled features: h = [f_1(x_1); ...; f_M(x_M)]."""

    def __init__(self, input_dims: dict[str, int]):
        super().__init__()
        self.modalities = sorted(input_dims)
        self.dim = sum(input_dims.values())

    def forward(self, features: dict[str, Features]) -> torch.Tensor:
        return torch.cat([features[m].pooled for m in self.modalities], dim=-1)


class LateFusion(nn.Module):
    """The seed's h = sum_i alpha_i f_i(x_i): one branch f_i per modality, alpha = softmax of learnt logits."""

    def __init__(self, input_dims: dict[str, int], dim: int = 256):
        super().__init__()
        self.modalities = sorted(input_dims)
        self.branches = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(input_dims[m], dim), nn.GELU()) for m in self.modalities}
        )
        self.alpha_logits = nn.Parameter(torch.zeros(len(self.modalities)))
        self.dim = dim

    def alpha(self) -> torch.Tensor:
        """The normalised modality weights (they sum to 1)."""
        return torch.softmax(self.alpha_logits, dim=0)

    def forward(self, features: dict[str, Features]) -> torch.Tensor:
        alpha = self.alpha()
        return sum(alpha[i] * self.branches[m](features[m].pooled) for i, m in enumerate(self.modalities))


class MiddleFusion(nn.Module):
    """Token-level fusion: each modality's tokens (image feature-map cells, word pieces) attend to the other
    modality's tokens (co-attention), then each stream is mean-pooled and the results concatenated.
    With a single modality the stream attends to itself."""

    def __init__(self, input_dims: dict[str, int], dim: int = 128, heads: int = 4, layers: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        self.modalities = sorted(input_dims)
        # Every encoder's tokens have the width of its pooled features.
        self.project = nn.ModuleDict({m: nn.Linear(input_dims[m], dim) for m in self.modalities})
        # Tells the attention which modality a token came from.
        self.modality_embedding = nn.ParameterDict({m: nn.Parameter(torch.zeros(dim)) for m in self.modalities})
        self.layers = nn.ModuleList(
            [nn.ModuleDict({m: CrossAttentionBlock(dim, heads, dropout) for m in self.modalities}) for _ in range(layers)]
        )
        self.norm = nn.LayerNorm(dim)
        self.dim = dim * len(self.modalities)

    def forward(self, features: dict[str, Features]) -> torch.Tensor:
        streams = {m: self.project[m](features[m].tokens) + self.modality_embedding[m] for m in self.modalities}
        masks = {m: features[m].mask for m in self.modalities}
        for layer in self.layers:
            updated = {}
            for m in self.modalities:
                others = [o for o in self.modalities if o != m] or [m]
                context = torch.cat([streams[o] for o in others], dim=1)
                context_mask = torch.cat([masks[o] for o in others], dim=1)
                updated[m] = layer[m](streams[m], context, context_mask)
            streams = updated
        return torch.cat([masked_mean(self.norm(streams[m]), masks[m]) for m in self.modalities], dim=-1)


class CrossAttentionBlock(nn.Module):
    """Pre-norm transformer block whose attention reads from another sequence: x + attn(x, context) + ffn."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm_query, self.norm_context, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        context = self.norm_context(context)
        attended, _ = self.attention(self.norm_query(x), context, context, key_padding_mask=~context_mask,
                                     need_weights=False)
        x = x + attended
        return x + self.ffn(self.norm_ffn(x))
