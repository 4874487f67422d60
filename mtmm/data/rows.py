"""Batches built from raw rows, for sources too large to check up front (data=hf, data=webdataset): each row's
labels are parsed, its image decoded and its text tokenised when a batch asks for it, and a bad row met on the
way follows data.on_bad_sample (error: stop naming the file or shard, row or key, and column; skip: the row stays
in the batch with every task unlabelled and every modality absent, so it adds nothing to losses or metrics).

A row is a dict: `image` (encoded bytes, a path, or None), `text`, `id` and one cell per task target, plus WHERE,
the place named in messages ("data.parquet, row 12" / "shard-0003.tar, key 000123").
"""

import io
import logging
import warnings
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from mtmm.data.collate import pad_token_ids
from mtmm.data.dataset import different_sizes
from mtmm.data.images import ImageTransform, too_many_pixels
from mtmm.errors import UserError
from mtmm.tasks import TaskSpec, parse_target, placeholder

log = logging.getLogger(__name__)

WHERE = "_where"  # key of a row: where it came from, for messages
BAD = "_bad"  # key of a row that could not even be read (a UserError): it meets the bad-sample policy in its batch


class BadRows:
    """The bad-sample policy, applied as rows are met; counts what it skipped in this process."""

    def __init__(self, policy: str):
        if policy not in ("error", "skip"):
            raise UserError(f"data.on_bad_sample={policy!r}; use error or skip")
        self.policy, self.skipped = policy, 0

    def met(self, error: UserError) -> None:
        if self.policy == "error":
            raise error
        if self.skipped == 0:  # one warning, as ManifestDataset gives; later ones are counted
            log.warning("skipping bad samples (data.on_bad_sample=skip); the first: %s", error)
        self.skipped += 1


def decode_image(value, image_root: Path | None, transform: ImageTransform, where: str) -> torch.Tensor:
    """Encoded bytes or a path -> the uint8 tensor the transform makes; a UserError naming `where` otherwise."""
    name = "the image bytes" if isinstance(value, (bytes, bytearray)) else str(value)
    try:
        if isinstance(value, (bytes, bytearray)):
            file = io.BytesIO(value)
        else:
            path = Path(value) if image_root is None else Path(image_root) / str(value)
            name = str(path)
            if not path.is_file():
                raise UserError(f"{where}, column 'image': image file {path} does not exist")
            file = path.open("rb")
        with file, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                return transform(image)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise UserError(too_many_pixels(f"{where}, column 'image'", name, error)) from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise UserError(f"{where}, column 'image': cannot read image {name}: {error}") from None


def build_batch(rows: list[dict], index: list[int], tasks: list[TaskSpec], bad: BadRows, *,
                transform: ImageTransform | None, image_root: Path | None, tokenizer, max_length: int,
                image_size: tuple | None = None, augment=None, side: int | None = None,
                epochs: list[int] | None = None) -> dict:
    """The batch dict of DESIGN.md from raw rows. `image_size`: (3, H, W) of a blank image when no row of the batch
    has one and the transform keeps the files' size (the size the start-up sample found)."""
    targets = {task.name: [] for task in tasks}
    images, texts, has_image = [], [], []
    for row in rows:
        try:
            if BAD in row:
                raise row[BAD]
            parsed = {task.name: parse_target(task, row.get(task.target), f"{row[WHERE]}, column {task.target!r}")
                      for task in tasks}
            image = None
            if transform is not None and row.get("image") not in (None, b"", ""):
                image = decode_image(row["image"], image_root, transform, row[WHERE])
            text = row.get("text")
            text = "" if text is None else str(text)
        except UserError as error:
            bad.met(error)
            parsed, image, text = {task.name: None for task in tasks}, None, ""
        for name, value in parsed.items():
            targets[name].append(value)
        images.append(image)
        has_image.append(image is not None)
        texts.append(text)
    batch = {"index": torch.as_tensor(index, dtype=torch.long)}
    present = {}
    if transform is not None:
        batch["image"] = stack_images(images, rows, transform, image_size)
        present["image"] = torch.tensor(has_image)
        if augment is not None:
            batch["image"] = augment(batch["image"], side, epochs, list(index), present["image"])
    if tokenizer is not None:
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        batch["text"] = pad_token_ids(ids, tokenizer.pad_token_id or 0)
        present["text"] = torch.tensor([bool(text) for text in texts])
    batch["present"] = present
    batch["targets"] = {task.name: torch.tensor([placeholder(task) if value is None else value
                                                 for value in targets[task.name]]) for task in tasks}
    batch["target_mask"] = {name: torch.tensor([value is not None for value in values])
                            for name, values in targets.items()}
    return batch


def stack_images(images: list, rows: list[dict], transform: ImageTransform, image_size: tuple | None) -> torch.Tensor:
    """uint8 [B, 3, H, W]; an absent (or skipped) image is a blank of the batch's size."""
    shapes = [image.shape for image in images if image is not None]
    usual = shapes[0] if shapes else (3, transform.side, transform.side) if transform.side else image_size or (3, 1, 1)
    for image, row in zip(images, rows):
        if image is not None and image.shape != usual:
            raise UserError(different_sizes(f"{row[WHERE]}, column 'image'", "of this row", tuple(image.shape),
                                            tuple(usual), "others are"))
    return torch.stack([image if image is not None else torch.zeros(usual, dtype=torch.uint8) for image in images])


def check_sample(rows: list[dict], tasks: list[TaskSpec], bad: BadRows, transform: ImageTransform | None,
                 image_root: Path | None) -> tuple | None:
    """Parse and decode a few rows before training (bad input fails early, not at step 10 000); returns the image
    shape they have, for blanks. The other rows are checked when a batch meets them."""
    shape = None
    for row in rows:
        try:
            if BAD in row:
                raise row[BAD]
            for task in tasks:
                parse_target(task, row.get(task.target), f"{row[WHERE]}, column {task.target!r}")
            if transform is not None and row.get("image") not in (None, b"", ""):
                image = decode_image(row["image"], image_root, transform, row[WHERE])
                if shape is not None and image.shape != shape and transform.size is None:
                    raise UserError(different_sizes(f"{row[WHERE]}, column 'image'", "of this row", tuple(image.shape),
                                                    tuple(shape), "earlier ones are"))
                shape = shape or image.shape
        except UserError as error:
            bad.met(error)
    return shape
