"""What an image encoder's pretrained weights expect of their input: the size they were trained at (resize, then
centre crop) and, where the encoder reads it, the normalisation. The data side builds its transform from this."""

from omegaconf import DictConfig

from mtmm.models.image import weights_preset


def image_preset(image: DictConfig) -> dict | None:
    """{"resize", "crop", "mean", "std"} for the configured image encoder's weights; None when they prescribe nothing
    (random init, a small CNN, a state dict file)."""
    if "weights" in image and "name" in image:
        return weights_preset(image.name, image.weights)
    return None
