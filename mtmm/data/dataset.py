"""Image+text samples read from a JSONL manifest: one JSON object per line with an image path, a text and one
field per task. Labels are checked and mapped to indices once, up front; images are decoded per item."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor, resize

from mtmm.errors import UserError


@dataclass(frozen=True)
class TaskSpec:
    """What the data side needs to know about one task."""

    name: str
    type: str  # multiclass | binary
    target: str  # manifest field
    classes: tuple[str, ...]


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> uint8 tensor [3,H,W]; deterministic, so evaluation sees exactly what training saw.

    Images stay uint8 until the encoder normalises a whole batch on the device: a quarter of the bytes to move,
    and one vectorised op per batch instead of one per image.
    """

    size: int | None = None  # resize the shorter side to this, None keeps the file's size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        tensor = pil_to_tensor(image.convert("RGB"))
        if self.size is not None:
            tensor = resize(tensor, [self.size], antialias=True)
        return tensor


def read_jsonl(path: Path) -> list[dict]:
    """All records of a JSONL manifest; a malformed line is an error naming the file and line."""
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}, line {number}: not valid JSON ({error.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}, line {number}: expected a JSON object, got {line.strip()[:80]!r}")
            records.append(record)
    if not records:
        raise UserError(f"manifest {path} holds no samples")
    return records


def label_index(task: TaskSpec, value, where: str) -> int | None:
    """A class name or integer -> class index; None (or "") means the sample has no label for this task."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        if 0 <= value < len(task.classes):
            return value
        raise UserError(f"{where}: label {value} of task {task.name!r} is out of range 0..{len(task.classes) - 1}")
    if isinstance(value, str) and value in task.classes:
        return task.classes.index(value)
    raise UserError(
        f"{where}: label {value!r} of task {task.name!r} is not one of its classes {list(task.classes)} "
        f"(or an index 0..{len(task.classes) - 1})"
    )


class ManifestDataset(Dataset):
    """Samples of one split. Texts are tokenised once here, not per step."""

    def __init__(self, records: list[dict], manifest: Path, image_root: Path, tasks: list[TaskSpec],
                 transform: ImageTransform | None, tokenizer=None, max_length: int = 64):
        self.manifest = manifest  # named in error messages
        self.targets: dict[str, list[int | None]] = {task.name: [] for task in tasks}
        for row, record in enumerate(records, start=1):
            for task in tasks:
                if task.target not in record:
                    raise UserError(f"{manifest}, line {row}: no field {task.target!r} (the target of task {task.name!r})")
                where = f"{manifest}, line {row}, field {task.target!r}"
                self.targets[task.name].append(label_index(task, record[task.target], where))
        self.ids = [str(record.get("id", row)) for row, record in enumerate(records)]
        self.image_paths = [image_root / record["image"] for record in records] if transform else None
        self.transform = transform
        self.input_ids = None
        if tokenizer is not None:
            texts = [str(record.get("text") or "") for record in records]
            self.input_ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        sample = {"index": index, "targets": {name: values[index] for name, values in self.targets.items()}}
        if self.transform is not None:
            path = self.image_paths[index]
            try:
                with Image.open(path) as image:
                    sample["image"] = self.transform(image)
            except (OSError, UnidentifiedImageError) as error:
                raise UserError(f"{self.manifest}, line {index + 1}: cannot read image {path}: {error}") from None
        if self.input_ids is not None:
            sample["input_ids"] = self.input_ids[index]
        return sample
