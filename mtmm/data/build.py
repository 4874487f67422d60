"""Config -> the data side of a run: datasets per split (labels, statistics and tokenizer learnt from the training
split or taken from a checkpoint), the image transform, and the loaders."""

from dataclasses import dataclass
from functools import partial

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from mtmm.build import has_encoder, instantiate
from mtmm.cache.features import SkipModalities
from mtmm.data.augment import build_augment
from mtmm.data.collate import finish_batch
from mtmm.data.dataset import ManifestDataset
from mtmm.data.images import ImageTransform
from mtmm.data.sampler import EpochShuffle
from mtmm.data.sources import DataSource
from mtmm.data.streamed import ShardSplit, build_streamed_data, stream_loader
from mtmm.data.tokenizer import tokenizer_from_files, tokenizer_to_files
from mtmm.data.workers import loader_workers, worker_options
from mtmm.errors import UserError
from mtmm.models.presets import image_preset
from mtmm.tasks import TaskSpec, build_tasks, check_tasks


@dataclass
class Data:
    datasets: dict[str, ManifestDataset]  # split -> dataset (a TableDataset or ShardSplit for data=hf / webdataset)
    tasks: list[TaskSpec]
    tokenizer: object | None  # a transformers tokenizer, None without a text encoder

    def state(self) -> dict:
        """What a checkpoint needs to rebuild this data side: label names, regression statistics, tokenizer."""
        state = {"classes": {task.name: list(task.classes) for task in self.tasks},
                 "stats": {task.name: [task.mean, task.std] for task in self.tasks},
                 "skipped": {split: dataset.skipped for split, dataset in self.datasets.items()},
                 "calibration": {task.name: task.temperature for task in self.tasks if task.temperature != 1.0}}
        if self.tokenizer is not None:
            state["tokenizer_files"] = tokenizer_to_files(self.tokenizer)
        return state


def build_data(cfg: DictConfig, splits: tuple[str, ...] = ("train", "val", "test"), saved: dict | None = None,
               origin: str = "checkpoint") -> Data:
    """Datasets for `splits`. Label names, statistics and the tokenizer are learnt from the training split, or
    taken from a checkpoint's `data` entry (`saved`, read from `origin`) when evaluating."""
    if not (has_encoder(cfg, "image") or has_encoder(cfg, "text")):
        raise UserError("both encoder/image and encoder/text are none; configure at least one modality")
    check_tasks(cfg)
    source = instantiate(cfg.data.source)
    if not isinstance(source, DataSource):  # data=hf or data=webdataset: rows read per batch (data/streamed.py)
        transform = image_transform(cfg) if has_encoder(cfg, "image") else None
        augment = build_augment(cfg.get("augment"), cfg.seed) if transform is not None else None
        return Data(*build_streamed_data(cfg, source, splits, saved, origin, transform, augment))
    train_records = source.records["train"]
    tasks = build_tasks(cfg, train_records, saved)
    tokenizer = None
    if has_encoder(cfg, "text"):
        if saved is not None:
            tokenizer = tokenizer_from_files(saved["tokenizer_files"], origin)
        else:
            texts = [str(record.get("text") or "") for record in train_records]
            tokenizer = instantiate(cfg.encoder.text.tokenizer, texts=texts)
    transform = augment = None
    if has_encoder(cfg, "image"):
        transform = image_transform(cfg)
        augment = build_augment(cfg.get("augment"), cfg.seed)
    max_length = cfg.encoder.text.get("max_length", 64)
    datasets = {}
    for split in splits:
        # Only the training split is augmented: decoded (and cached) a little larger, cropped per sample.
        augmented = augment is not None and split == "train"
        split_transform = ImageTransform(size=augment.stored_side(transform.side),
                                         interpolation=transform.interpolation) if augmented else transform
        datasets[split] = ManifestDataset(
            source.records[split], source.files[split], source.image_root, tasks, split_transform, tokenizer,
            max_length, on_bad_sample=cfg.data.get("on_bad_sample", "error"),
            check_images=cfg.data.get("check_images", True), augment=augment if augmented else None)
        datasets[split].side = transform.side if transform is not None else None
    return Data(datasets=datasets, tasks=tasks, tokenizer=tokenizer)


def image_transform(cfg: DictConfig) -> ImageTransform:
    """The encoder's own size wins (encoder.image.size, or what its torchvision weights were trained at), then
    data.image_size; null everywhere keeps the files' size."""
    image = cfg.encoder.image
    if image.get("size"):  # hf / timm: their processor's values, written into the config by fill_image_preprocessing
        return ImageTransform(size=image.size, crop=image.get("crop"), interpolation=image.get("interpolation") or
                              "bilinear")
    preset = image_preset(image)
    if preset is not None:
        return ImageTransform(size=preset["resize"], crop=preset["crop"])
    return ImageTransform(size=cfg.data.get("image_size"))


def build_loader(cfg: DictConfig, data: Data, split: str, seed: int = 0, device: torch.device | None = None,
                 rank: int = 0, world_size: int = 1, cached: dict | None = None) -> DataLoader:
    """Training draws its order from EpochShuffle (seeded by epoch: part of the run's determinism and of exact
    resumption); evaluation keeps the file order. With world_size > 1 each rank gets its share of the batch.
    `cached` (modality -> this split's cached encoder outputs, see cache/features.py): those inputs are not loaded."""
    training = split == "train"
    split_data = data.datasets[split]
    if isinstance(split_data, ShardSplit):
        return stream_loader(cfg, split_data, training, seed, device, rank, world_size)
    dataset = SkipModalities(split_data, cached) if cached else split_data
    loads_images = split_data.transform is not None and "image" not in (cached or {})
    workers = loader_workers(cfg.data.num_workers, loads_images, device)
    if training:
        sampler = EpochShuffle(len(dataset), seed, rank, world_size, with_epoch=split_data.augment is not None)
    elif world_size > 1:
        sampler = list(range(len(dataset)))[rank::world_size]
    else:
        sampler = None
    batch_size = cfg.data.batch_size if training else cfg.data.eval_batch_size
    if training and batch_size % world_size:
        raise UserError(f"data.batch_size={batch_size} must be a multiple of device.nproc_per_node={world_size}")
    return DataLoader(
        dataset,
        batch_size=batch_size // world_size if training else batch_size,
        sampler=sampler,
        # Its own generator: creating an iterator draws a seed from it, and drawing from the global RNG instead
        # would shift dropout's random numbers after a resume.
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=bool(cfg.data.get("persistent_workers", False)) and workers > 0,
        **worker_options(workers),
        pin_memory=bool(cfg.data.get("pin_memory", True)) and device is not None and device.type == "cuda",
        collate_fn=partial(finish_batch, cached=cached),
        drop_last=False,
    )
