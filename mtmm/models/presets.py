"""What an image encoder's pretrained weights expect of their input: the size they were trained at (resize, then
centre crop), the interpolation and the normalisation. The data side builds its transform from this."""

from omegaconf import DictConfig, open_dict

from mtmm.errors import UserError
from mtmm.models.image import weights_preset

PREPROCESSING = ("size", "crop", "mean", "std", "interpolation")
# Pillow's resampling numbers, as Hugging Face image processors store them -> torchvision's interpolation names
RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}


def image_preset(image: DictConfig) -> dict | None:
    """{"resize", "crop", "mean", "std"} for the configured torchvision encoder's weights; None when they prescribe
    nothing (random init, a small CNN, a state dict file)."""
    if "weights" in image and "name" in image and str(image.get("_target_", "")).endswith("TorchvisionEncoder"):
        return weights_preset(image.name, image.weights)
    return None


def fill_image_preprocessing(cfg: DictConfig) -> None:
    """A Hugging Face or timm image encoder's unset size / crop / mean / std / interpolation, from the processor or
    pretrained config saved with its weights, written into cfg.encoder.image: a new run's saved config then carries
    them, and evaluating or resuming it reads no file of the model. Values the user set are kept."""
    image = cfg.encoder.get("image")
    if image is None or not all(key in image for key in PREPROCESSING):
        return
    if all(image.get(key) is not None for key in PREPROCESSING):
        return
    target = str(image.get("_target_", ""))
    found = hf_preprocessing(image) if target.endswith("HFImageEncoder") else timm_preprocessing(image)
    with open_dict(image):
        for key in PREPROCESSING:
            if image.get(key) is None:
                image[key] = found[key]


def hf_preprocessing(image: DictConfig) -> dict:
    from transformers import AutoImageProcessor

    from mtmm.hub import offline
    offline()
    try:
        processor = AutoImageProcessor.from_pretrained(image.name, local_files_only=True)
    except (OSError, ValueError) as error:
        raise UserError(f"encoder.image.name={image.name}: no image processor (preprocessor_config.json) found "
                        f"offline to take the input size and normalisation from; put it beside the model or set "
                        f"encoder.image.size / crop / mean / std ({str(error).splitlines()[0][:160]})") from None
    size = dict(getattr(processor, "size", None) or {})
    crop_size = dict(getattr(processor, "crop_size", None) or {})
    side = size.get("shortest_edge") or size.get("height") or 224
    crop = crop_size.get("height") if getattr(processor, "do_center_crop", False) and crop_size else side
    crop_pct = getattr(processor, "crop_pct", None)
    if crop_pct and "shortest_edge" in size and side < 384:  # ConvNeXt's processor: resize to side / crop_pct first
        side, crop = int(side / crop_pct), side
    resample = getattr(processor, "resample", 2)
    return {"size": int(side), "crop": int(crop), "mean": [float(v) for v in processor.image_mean],
            "std": [float(v) for v in processor.image_std],
            "interpolation": RESAMPLE.get(int(resample) if resample is not None else 2, "bilinear")}


def timm_preprocessing(image: DictConfig) -> dict:
    from mtmm.models.image_timm import import_timm
    timm = import_timm()
    pretrained_cfg = timm.models.get_pretrained_cfg(image.name)
    if pretrained_cfg is None:
        raise UserError(f"encoder.image.name={image.name}: timm knows no pretrained config for it to take the input "
                        f"size and normalisation from; set encoder.image.size / crop / mean / std")
    crop = pretrained_cfg.input_size[-1]
    interpolation = pretrained_cfg.interpolation if pretrained_cfg.interpolation in ("bilinear", "bicubic",
                                                                                     "nearest") else "bicubic"
    return {"size": int(crop / (pretrained_cfg.crop_pct or 1.0)), "crop": int(crop),
            "mean": [float(v) for v in pretrained_cfg.mean], "std": [float(v) for v in pretrained_cfg.std],
            "interpolation": interpolation}
