"""Images as the model sees them: any file Pillow opens -> upright 8-bit RGB -> a deterministic uint8 tensor, with
decompression bombs refused by name."""

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torchvision.transforms.functional import InterpolationMode, center_crop, pil_to_tensor, resize

from mtmm.errors import UserError


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> uint8 tensor [3,H,W]; deterministic, so evaluation sees exactly what training saw.

    Images stay uint8 until the encoder normalises a whole batch on the device: a quarter of the bytes to move,
    and one vectorised op per batch instead of one per image.
    """

    size: int | None = None  # resize the shorter side to this and centre-crop a square; None keeps the file's size
    crop: int | None = None  # the square's side when it differs from `size` (torchvision weights: 256 -> 224)
    interpolation: str = "bilinear"  # or bicubic / nearest, as the encoder's pretrained preprocessing says

    def __call__(self, image: Image.Image) -> torch.Tensor:
        tensor = pil_to_tensor(to_rgb(image))
        if self.size is not None:
            side = self.crop or self.size
            tensor = center_crop(resize(tensor, [self.size], InterpolationMode(self.interpolation), antialias=True),
                                 [side, side])
        return tensor

    @property
    def side(self) -> int | None:
        return self.crop or self.size


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's modes for 16-bit greyscale PNG and TIFF files
TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def to_rgb(image: Image.Image) -> Image.Image:
    """Any image Pillow opens -> 8-bit RGB as a viewer shows it: turned upright by its EXIF orientation, 16-bit
    values scaled to 8 bits (convert("RGB") would clip them, nearly all to 255), and transparent pixels
    composited over white (dropping the alpha channel would show whatever colour they happen to hold)."""
    if orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT:
        image = eight_bit(image)
    if image.mode == "P" or "transparency" in image.info:  # a palette, or one colour marked transparent
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBa", "RGBA"):
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return image if image.mode == "RGB" else image.convert("RGB")  # L, 1, CMYK, YCbCr, ...


def eight_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale -> 8-bit (mode L), value / 257 rounded: 0 -> 0, 65535 -> 255. Mode I (32-bit) is what
    Pillow gives some 16-bit files, so it is read as 16-bit too, values outside 0..65535 clipped."""
    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))


def orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright; also when the file has none), read without decoding the pixels:
    the image check uses it too. So a PNG's EXIF counts only when it comes before the pixel data (Pillow would
    decode the whole image to look for it after them)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return image.getexif().get(ExifTags.Base.Orientation, 1) or 1


@contextmanager
def open_image(path: Path, where: str) -> Iterator[Image.Image]:
    """Image.open, with an image of more than Image.MAX_IMAGE_PIXELS pixels (Pillow's guard against decompression
    bombs, about 89 million by default) a UserError: Pillow would only warn up to twice the limit and raise a
    DecompressionBombError above. Other failures (OSError, UnidentifiedImageError) are the caller's to report."""
    with open(path, "rb") as file:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(file)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
            raise UserError(too_many_pixels(where, path, error)) from None
        with image:
            yield image


def too_many_pixels(where: str, path: Path, error: Exception) -> str:
    counted = re.search(r"\((\d+) pixels\)", str(error))  # Pillow's message holds the count, not the size
    size = f"has {int(counted.group(1)):,} pixels" if counted else "has too many pixels"
    return (f"{where}: image {path} {size}, more than the limit of {Image.MAX_IMAGE_PIXELS:,} "
            f"(PIL.Image.MAX_IMAGE_PIXELS, a guard against decompression bombs); downscale the file (it is resized "
            f"to data.image_size anyway)")
