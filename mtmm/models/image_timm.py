"""timm models as image encoders (`encoder/image=timm encoder.image.name=convnext_tiny`): any model timm creates,
weights from a local file (`encoder.image.weights=/path/model.safetensors`) or the local Hugging Face cache
(`encoder.image.weights=hub`), never downloaded. Its pretrained config's input size, crop, interpolation, mean and
std are written into encoder.image by mtmm-train (mtmm/models/presets.py), so mtmm-eval rebuilds the architecture
from the name alone and loads the checkpoint's weights."""

from pathlib import Path

import torch
from torch import nn

from mtmm.errors import UserError
from mtmm.hub import offline
from mtmm.models.adapters import add_adapters
from mtmm.models.features import Features, image_features, set_frozen
from mtmm.models.image import Normalize
from mtmm.models.image_hf import probe_width


def import_timm():
    try:
        import timm
    except ImportError:
        raise UserError('encoder/image=timm needs the timm package: pip install "mtmm[backbones]"') from None
    return timm


def create(name: str, weights: str | None, pretrained: bool):
    """timm.create_model(name) without a classifier; with its pretrained weights when `weights` is set and this is
    not a rebuild from a checkpoint. Only names timm registers: a `hf-hub:` name would fetch its config."""
    timm = import_timm()
    if name not in timm.list_models():
        raise UserError(f"encoder.image.name={name!r} is not a timm model; list them with "
                        f"python -c \"import timm; print(timm.list_models('convnext*'))\"")
    if weights is None or not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0)
    if weights != "hub" and not Path(weights).expanduser().is_file():
        raise UserError(f"encoder.image.weights={weights}: no such file; give a local weight file of {name} "
                        f"(.safetensors / .pth), hub for the local Hugging Face cache, or null for random init")
    offline()
    overlay = None if weights == "hub" else {"file": str(Path(weights).expanduser())}
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
    except (OSError, RuntimeError, ValueError) as error:
        where = ("the local Hugging Face cache (HF_HOME); fill it on a machine with internet with "
                 f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\"" if weights == "hub"
                 else f"{weights}")
        raise UserError(f"encoder.image.weights={weights}: the weights of {name} could not be loaded from {where} "
                        f"({(str(error).splitlines() or [type(error).__name__])[0][:200]})") from None


class TimmEncoder(nn.Module):
    """pooled: timm's own head pooling (forward_head with pre_logits), layer-normalised; tokens: forward_features
    (the token sequence of a transformer, the cells of a convolutional network's last feature map)."""

    def __init__(self, name: str, weights: str | None = None, freeze: bool = False, size: int | None = None,
                 crop: int | None = None, mean=None, std=None, interpolation: str | None = None,
                 gradient_checkpointing: bool = False, lora=None, ia3=None, pretrained: bool = True):
        super().__init__()
        if mean is None or std is None:
            raise UserError("encoder.image.mean/std are not set; set encoder.image.mean=[...] encoder.image.std=[...]")
        self.model = create(name, weights, pretrained)
        if gradient_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.normalize = Normalize(mean, std)
        set_frozen(self.model, freeze)
        self.model = add_adapters(self.model, "image", lora, ia3)
        self.frozen = not any(p.requires_grad for p in self.model.parameters())  # adapters train
        self.dim = probe_width(self, crop or size or 224)
        self.norm = nn.LayerNorm(self.dim)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(self.normalize(images).contiguous())
        pooled = self.model.forward_head(features, pre_logits=True)
        tokens = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features
        return pooled, tokens

    def forward(self, images: torch.Tensor) -> Features:
        return image_features(*self.encode(images), self.norm)
