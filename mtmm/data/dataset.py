"""Image+text samples from manifest records: an image path, a text and one field per task.

Every label is parsed and checked once, up front, and every image file is opened and verified before training
starts, so bad input fails early with the file, line, column and value; images are decoded per item.
"""

import logging
from collections import Counter
from pathlib import Path

import torch
from PIL import UnidentifiedImageError
from torch.utils.data import Dataset

from mtmm.data.images import TURNED, ImageTransform, open_image, orientation
from mtmm.data.readers import LINE, columns_of
from mtmm.errors import UserError
from mtmm.tasks import TaskSpec, parse_target, placeholder

log = logging.getLogger(__name__)


class ManifestDataset(Dataset):
    """Samples of one split. Texts are tokenised once here, not per step.

    An empty text or a missing image path marks that modality absent for the sample (`present` in the batch);
    an empty label marks the task unlabelled for the sample (`target_mask`). With on_bad_sample="skip" a row that
    fails a check is dropped and counted (`self.skipped`) instead of stopping the run.
    """

    def __init__(self, records: list[dict], manifest: Path, image_root: Path, tasks: list[TaskSpec],
                 transform: ImageTransform | None, tokenizer=None, max_length: int = 64, *,
                 on_bad_sample: str = "error", check_images: bool = True, augment=None):
        if on_bad_sample not in ("error", "skip"):
            raise UserError(f"data.on_bad_sample={on_bad_sample!r}; use error or skip")
        self.manifest, self.tasks, self.transform = manifest, tasks, transform
        # augment (data/augment.py, training split only): `transform` then decodes a little larger than the final
        # side, and batch() crops each row to `side` (randomly for indices the training sampler tags with an epoch).
        self.augment, self.side = augment, None
        check_columns(records, manifest, tasks, transform is not None, tokenizer is not None)
        if transform is not None:
            check_image_root(records, manifest, Path(image_root))
        self.image_size: tuple[int, int] | None = None  # (width, height) shared by all images when not resized
        kept, self.skipped = [], 0
        for row, record in enumerate(records, start=1):
            try:
                kept.append(self.check(record, record.get(LINE, row), image_root, check_images))
            except UserError as error:
                if on_bad_sample == "error":
                    raise
                if self.skipped == 0:
                    log.warning("skipping bad samples of %s (data.on_bad_sample=skip); the first: %s", manifest, error)
                self.skipped += 1
        if not kept:
            raise UserError(f"{manifest}: no usable sample left ({self.skipped} skipped)")
        self.lines = [sample["line"] for sample in kept]
        self.ids = [sample["id"] for sample in kept]
        self.targets = {task.name: [sample["targets"][task.name] for sample in kept] for task in tasks}
        self.image_paths = [sample["image"] for sample in kept]
        self.texts = [sample["text"] or "" for sample in kept]  # raw, kept for robustness tests that corrupt them
        self.input_ids = None
        self.has_text = [bool(sample["text"]) for sample in kept]
        self.token_ids = self.token_lengths = None  # the token ids as a padded [N, T] column and their lengths
        if tokenizer is not None:
            self.input_ids = tokenizer(self.texts, truncation=True, max_length=max_length)["input_ids"]
            self.token_lengths = torch.tensor([len(ids) for ids in self.input_ids])
            self.token_ids = torch.full((len(kept), int(self.token_lengths.max())), tokenizer.pad_token_id or 0,
                                        dtype=torch.int32)
            for row, ids in enumerate(self.input_ids):
                self.token_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        # Per-split columns, indexed by `batch`; an unlabelled sample gets a placeholder target, masked out of
        # that task's loss and metrics.
        self.target_values = {task.name: torch.tensor([placeholder(task) if value is None else value
                                                       for value in self.targets[task.name]]) for task in tasks}
        self.target_mask = {name: torch.tensor([value is not None for value in values])
                            for name, values in self.targets.items()}
        self.present = {}
        if transform is not None:
            self.present["image"] = torch.tensor([path is not None for path in self.image_paths])
        if tokenizer is not None:
            self.present["text"] = torch.tensor(self.has_text)
        self.image_store = None  # the split's decoded images, when cache/images.py made them (else decoded per batch)

    def check(self, record: dict, line: int, image_root: Path, check_images: bool) -> dict:
        """One record -> its parsed sample, or a UserError naming the file, line, column and value."""
        targets = {task.name: parse_target(task, record.get(task.target), f"{self.manifest}, line {line}, "
                                           f"column {task.target!r}") for task in self.tasks}
        image = None
        if self.transform is not None and record.get("image"):
            image = Path(image_root) / str(record["image"])
            if check_images:
                self.check_image(image, f"{self.manifest}, line {line}, column 'image'")
        text = record.get("text")
        return {"line": line, "id": str(record.get("id", line)), "targets": targets, "image": image,
                "text": str(text) if text not in (None, "") else None}

    def check_image(self, path: Path, where: str) -> None:
        if not path.is_file():
            raise UserError(f"{where}: image file {path} does not exist")
        try:
            with open_image(path, where) as image:
                width, height = image.size
                size = (height, width) if orientation(image) in TURNED else (width, height)  # as to_rgb turns it
                image.verify()  # reads the whole file and checks its structure, without decoding pixels
        except (OSError, UnidentifiedImageError, SyntaxError) as error:
            raise UserError(f"{where}: cannot read image {path}: {error}") from None
        if self.transform.size is None:
            if self.image_size is None:
                self.image_size = size
            elif size != self.image_size:
                raise UserError(different_sizes(where, path, f"{size[0]}x{size[1]}",
                                                f"{self.image_size[0]}x{self.image_size[1]}", "earlier ones are"))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitems__(self, indices: list[int]) -> dict:
        """What a DataLoader calls with each batch's indices: the whole batch at once (see batch)."""
        return self.batch(indices)

    def __getitem__(self, index: int) -> dict:
        """Sample `index` as a batch of one (the one way this dataset builds its output: batch)."""
        return self.batch([index])

    def batch(self, indices, without: frozenset[str] = frozenset()) -> dict:
        """The batch dict of DESIGN.md for these samples: a few indexing operations on per-split columns rather
        than a dict per sample and a loop over them, so that a step waits for as little as possible.
        `without`: modalities whose inputs are not loaded (their `present` flags still are)."""
        epochs = None
        if len(indices) and isinstance(indices[0], tuple):  # (epoch, index) pairs from EpochShuffle(with_epoch)
            epochs, indices = [epoch for epoch, _ in indices], [i for _, i in indices]
        index = torch.as_tensor(indices, dtype=torch.long)
        batch = {"index": index}
        if self.transform is not None and "image" not in without:
            batch["image"] = self.images(index.tolist())
            if self.augment is not None:
                present = self.present["image"][index]
                batch["image"] = self.augment(batch["image"], self.side, epochs, index.tolist(), present)
        if self.token_ids is not None and "text" not in without:
            length = int(self.token_lengths[index].max()) if len(index) else 0
            mask = torch.arange(length) < self.token_lengths[index, None]
            batch["text"] = {"input_ids": self.token_ids[index, :length].long(), "attention_mask": mask.long()}
        batch["present"] = {modality: flags[index] for modality, flags in self.present.items()}
        batch["targets"] = {name: values[index] for name, values in self.target_values.items()}
        batch["target_mask"] = {name: labelled[index] for name, labelled in self.target_mask.items()}
        return batch

    def images(self, indices: list[int]) -> torch.Tensor:
        """uint8 [B, 3, H, W]: from the decoded-image cache when the split has one, else decoded now."""
        if self.image_store is not None:
            return self.image_store.read(indices)
        decoded = {i: self.load_image(self.image_paths[i], i) for i in indices if self.image_paths[i] is not None}
        shapes = Counter(image.shape for image in decoded.values())
        usual = shapes.most_common(1)[0][0] if shapes else self.blank_image().shape
        for i, image in decoded.items():  # only data.check_images=false lets differing sizes through
            if image.shape != usual:
                raise UserError(different_sizes(f"{self.manifest}, line {self.lines[i]}", self.image_paths[i],
                                                tuple(image.shape), tuple(usual), "others are"))
        # An absent image: a blank of the batch's size (the size is unknown up front only without data.check_images)
        return torch.stack([decoded[i] if i in decoded else torch.zeros(usual, dtype=torch.uint8) for i in indices])

    def load_image(self, path: Path, index: int) -> torch.Tensor:
        try:
            with open_image(path, f"{self.manifest}, line {self.lines[index]}") as image:
                return self.transform(image)
        except (OSError, UnidentifiedImageError, ValueError) as error:  # ValueError: a mode with no RGB conversion
            raise UserError(f"{self.manifest}, line {self.lines[index]}: cannot read image {path}: {error}") from None

    def blank_image(self) -> torch.Tensor:
        """Stands in for an absent image (the model replaces its features with a learnt 'missing' embedding)."""
        width, height = (self.transform.side,) * 2 if self.transform.side else (self.image_size or (1, 1))
        return torch.zeros(3, height, width, dtype=torch.uint8)


def different_sizes(where: str, path, size, expected, whose: str) -> str:
    return (f"{where}: image {path} is {size} but {whose} {expected}; set data.image_size (e.g. 224) to resize "
            f"and crop them all to one size")


def check_columns(records: list[dict], manifest: Path, tasks: list[TaskSpec], images: bool, texts: bool) -> None:
    """A column that no row has is a configuration error, not a missing value: say which columns exist."""
    present = columns_of(records)
    wanted = [(task.target, f"the target of task {task.name!r}; set tasks.{task.name}.target") for task in tasks]
    wanted += [("image", "the image path; map yours with data.source.columns.image=COLUMN")] if images else []
    wanted += [("text", "the text; map yours with data.source.columns.text=COLUMN")] if texts else []
    for column, role in wanted:
        if column not in present:
            raise UserError(f"{manifest}: no column {column!r} ({role}); the file has {sorted(present)}")


def check_image_root(records: list[dict], manifest: Path, image_root: Path) -> None:
    """A missing image folder is one error naming it, not one per image."""
    relative = any(record.get("image") and not Path(str(record["image"])).is_absolute() for record in records)
    if relative and not image_root.is_dir():
        raise UserError(f"{manifest}: the image folder {image_root} does not exist (the relative image paths start "
                        f"there; set data.source.image_root)")
