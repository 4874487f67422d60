"""What every encoder returns."""

from dataclasses import dataclass

import torch


@dataclass
class Features:
    """One modality's encoding of a batch."""

    pooled: torch.Tensor  # [B, D], layer-normalised
    tokens: torch.Tensor  # [B, T, D]: feature-map cells for images, word pieces for text
    mask: torch.Tensor  # [B, T] bool, True where a token is real (False for padding)


def image_features(pooled: torch.Tensor, tokens: torch.Tensor, norm: torch.nn.LayerNorm) -> Features:
    """An image encoder's Features: every token (patch or feature-map cell) is real."""
    mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    return Features(pooled=norm(pooled), tokens=tokens, mask=mask)


def set_frozen(module: torch.nn.Module, frozen: bool) -> None:
    """A frozen encoder takes no gradient; it is also kept in eval mode by the model (no BatchNorm/dropout drift)."""
    for parameter in module.parameters():
        parameter.requires_grad_(not frozen)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens [B,T,D] -> [B,D]; padding (mask False) is ignored."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)
