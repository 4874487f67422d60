"""Image encoders: a small CNN (fast on CPU) and any torchvision classification model."""

from pathlib import Path

import torch
import torchvision
from torch import nn

from mtmm.errors import UserError
from mtmm.models.features import Features, image_features, set_frozen


class SmallCNN(nn.Module):
    """One stride-2 conv + BatchNorm + ReLU per entry of `channels` (the first conv already has stride 2, which
    keeps it fast on CPU), then global average pooling.

    The feature map of the last stage doubles as the token sequence for middle fusion.
    """

    def __init__(self, channels: list[int] = (32, 64, 128), freeze: bool = False, mean=(0.5, 0.5, 0.5),
                 std=(0.25, 0.25, 0.25), pretrained: bool = True):
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers, width = [], 3
        for out in channels:
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            width = out
        # channels_last: about 20% faster convolutions on CPU (and the layout tensor cores want on GPU).
        self.body = nn.Sequential(*layers).to(memory_format=torch.channels_last)
        self.dim = width
        # Without a LayerNorm on each encoder's pooled output, the match task stayed at chance in joint training.
        self.norm = nn.LayerNorm(width)
        self.frozen = freeze
        set_frozen(self.body, freeze)

    def forward(self, images: torch.Tensor) -> Features:
        return features_from_map(self.body(self.normalize(images)), self.norm)


class Normalize(nn.Module):
    """uint8 images [B,3,H,W] -> float, scaled to 0..1, then (x - mean) / std per channel, in channels_last."""

    def __init__(self, mean, std):
        super().__init__()
        # Not saved in checkpoints: they come from the config, which the checkpoint carries.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=torch.channels_last)
        return (images.float() - self.mean) / self.std


def features_from_map(feature_map: torch.Tensor, norm: nn.LayerNorm) -> Features:
    """[B,C,H,W] feature map -> pooled [B,C] (mean over cells) and tokens [B,H*W,C]."""
    tokens = feature_map.flatten(2).transpose(1, 2)
    return image_features(tokens.mean(dim=1), tokens, norm)


class TorchvisionEncoder(nn.Module):
    """A torchvision classification model by name (torchvision.models.get_model), cut before its pooling."""

    def __init__(self, name: str = "resnet18", weights: str | None = None, freeze: bool = False,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), size: int | None = None,
                 pretrained: bool = True):
        super().__init__()
        preset = weights_preset(name, weights)
        if preset is not None:  # the weights were trained with their own normalisation: use it
            mean, std = preset["mean"], preset["std"]
        self.normalize = Normalize(mean, std)
        try:
            model = torchvision.models.get_model(name, weights=None)
        except ValueError:
            known = ", ".join(torchvision.models.list_models(torchvision.models))
            raise UserError(f"encoder.image.name={name!r} is not a torchvision classification model; known: {known}") from None
        if weights is not None and pretrained:
            model.load_state_dict(load_torchvision_weights(name, weights))
        self.body = feature_map_body(model, name).to(memory_format=torch.channels_last)
        self.dim = output_channels(self.body, size or 64)
        self.norm = nn.LayerNorm(self.dim)
        self.frozen = freeze
        set_frozen(self.body, freeze)

    def forward(self, images: torch.Tensor) -> Features:
        return features_from_map(self.body(self.normalize(images)), self.norm)


def output_channels(body: nn.Module, size: int) -> int:
    """The feature map's width, from one probe image in eval mode (a train-mode probe would move the BatchNorm
    statistics of freshly loaded weights, and fail on a 1x1 map)."""
    body.eval()
    with torch.no_grad():
        channels = body(torch.zeros(1, 3, size, size)).shape[1]
    body.train()
    return channels


def feature_map_body(model: nn.Module, name: str) -> nn.Module:
    """The part of a classifier that maps images to a [B,C,H,W] feature map."""
    if hasattr(model, "features"):  # vgg, densenet, mobilenet, efficientnet, convnext, ...
        return model.features
    if hasattr(model, "layer4") and hasattr(model, "avgpool"):  # resnet, resnext, wide_resnet, regnet-like stems
        children = dict(model.named_children())
        return nn.Sequential(*[module for key, module in children.items() if key not in ("avgpool", "fc")])
    raise UserError(
        f"encoder.image.name={name!r}: mtmm takes image features from a `features` module or a ResNet-style body, "
        f"and this model has neither; use e.g. resnet18, resnet50, mobilenet_v3_small, efficientnet_b0, convnext_tiny"
    )


def weights_preset(name: str, weights: str | None) -> dict | None:
    """For a torchvision weight name: the normalisation and image size its training used; None otherwise."""
    if weights is None or Path(weights).expanduser().exists() or Path(weights).suffix:
        return None
    entry = weight_entry(name, weights)
    transform = entry.transforms()
    return {"mean": list(transform.mean), "std": list(transform.std), "resize": transform.resize_size[0],
            "crop": transform.crop_size[0]}


def weight_entry(name: str, weights: str):
    try:
        enum = torchvision.models.get_model_weights(name)
    except ValueError:
        raise UserError(f"encoder.image.name={name!r} has no torchvision weights") from None
    try:
        return enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except KeyError:
        raise UserError(f"encoder.image.weights={weights!r} is not a weight of {name}; known: "
                        f"{[w.name for w in enum]} or a path to a state dict file") from None


def load_torchvision_weights(name: str, weights: str) -> dict:
    """A state dict from a local file, or from the local torch hub cache by weight name (never downloaded)."""
    path = Path(weights).expanduser()
    if not path.exists() and not path.suffix:  # a weight name such as IMAGENET1K_V1 or DEFAULT
        entry = weight_entry(name, weights)
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name
        if not path.is_file():
            raise UserError(
                f"encoder.image.weights={weights}: {path} is missing and mtmm never downloads. Fetch {entry.url} "
                f"on a machine with internet and put it at {path}, or set encoder.image.weights=/path/to/file.pth"
            )
    if not path.is_file():
        raise UserError(f"encoder.image.weights={weights}: no such file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to read means the same thing to the user
        raise UserError(f"encoder.image.weights: {path} is not a readable torch state dict ({error})") from None
