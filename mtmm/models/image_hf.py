"""Hugging Face vision models as image encoders: ViT, DeiT, DINOv2, ConvNeXt, Swin, ... and the vision tower of a
CLIP or SigLIP checkpoint, by local directory or cached id (`encoder/image=hf encoder.image.name=DIR`).

The image processor saved with the model gives the input size and normalisation: mtmm-train writes them into
encoder.image (size, crop, mean, std, interpolation) before anything is built (mtmm/models/presets.py), so the run's
config carries them and mtmm-eval needs neither the model's files nor its processor."""

import torch
from torch import nn

from mtmm.errors import UserError
from mtmm.models.adapters import add_adapters
from mtmm.models.features import Features, image_features, set_frozen
from mtmm.models.hf import load_tower, rebuild_tower
from mtmm.models.image import Normalize

POOLINGS = ("pooler", "cls", "mean")


class HFImageEncoder(nn.Module):
    """pooled: the model's pooler output (`pooler`; the mean of the tokens for a model without one), the first token
    (`cls`) or the mean of the tokens (`mean`), layer-normalised; tokens: the last hidden states, or the cells of the
    last feature map for convolutional models (ConvNeXt), for middle / cross-attention / FiLM fusion."""

    def __init__(self, name: str, pooling: str = "pooler", freeze: bool = False, size: int | None = None,
                 crop: int | None = None, mean=None, std=None, interpolation: str | None = None,
                 gradient_checkpointing: bool = False, trust_remote_code: bool = False, lora=None, ia3=None,
                 saved_config: str | None = None, pretrained: bool = True):
        super().__init__()
        if pooling not in POOLINGS:
            raise UserError(f"encoder.image.pooling={pooling!r}; use one of {list(POOLINGS)}")
        if mean is None or std is None:
            raise UserError(f"encoder.image.mean/std are not set and {name!r} has no image processor to take them "
                            f"from; set encoder.image.mean=[...] encoder.image.std=[...]")
        if pretrained:
            model, self.saved_config = load_tower(name, "image", trust_remote_code, gradient_checkpointing)
        else:
            model, self.saved_config = rebuild_tower(saved_config, "image", gradient_checkpointing), saved_config
        self.normalize = Normalize(mean, std)
        self.pooling = pooling
        self.model = model
        set_frozen(self.model, freeze)
        self.model = add_adapters(self.model, "image", lora, ia3)
        self.frozen = not any(p.requires_grad for p in self.model.parameters())  # adapters train
        self.dim = probe_width(self, crop or size or getattr(self.model.config, "image_size", 224))
        self.norm = nn.LayerNorm(self.dim)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled before the norm [B, D], tokens [B, T, D])."""
        output = self.model(pixel_values=self.normalize(images).contiguous())
        hidden = output.last_hidden_state
        tokens = hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden  # a feature map: its cells
        pooler = getattr(output, "pooler_output", None)
        if self.pooling == "pooler" and pooler is not None:
            pooled = pooler.flatten(1)
        elif self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            pooled = tokens.mean(dim=1)
        return pooled, tokens

    def forward(self, images: torch.Tensor) -> Features:
        return image_features(*self.encode(images), self.norm)

    def config_json(self) -> str:
        """The architecture, saved in checkpoints (image_config) so evaluation rebuilds the model without its files."""
        return self.saved_config


def probe_width(encoder, side: int) -> int:
    """The feature width, from one probe image in eval mode; the pooled and token widths must agree (fusion reads
    both at one width)."""
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        pooled, tokens = encoder.encode(torch.zeros(1, 3, side, side, dtype=torch.uint8))
    encoder.train(was_training)
    if pooled.shape[-1] != tokens.shape[-1]:
        raise UserError(f"encoder.image: the pooled features ({pooled.shape[-1]} wide) and the tokens "
                        f"({tokens.shape[-1]}) differ in width; use encoder.image.pooling=mean or cls")
    return pooled.shape[-1]
