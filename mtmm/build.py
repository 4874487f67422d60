"""Config -> objects, one component at a time: data, model, optimizer, scheduler, loss weighting."""

import inspect
import math
from dataclasses import dataclass
from functools import partial

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_method
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from mtmm.data.collate import finish_batch
from mtmm.data.dataset import ManifestDataset
from mtmm.data.images import ImageTransform
from mtmm.data.sampler import EpochShuffle
from mtmm.data.tokenizer import tokenizer_from_files, tokenizer_to_files
from mtmm.data.workers import loader_workers, worker_options
from mtmm.errors import UserError
from mtmm.cache.features import SkipModalities
from mtmm.models.image import weights_preset
from mtmm.models.mlp import mlp
from mtmm.models.model import MultiTaskModel
from mtmm.tasks import TaskSpec, build_tasks, check_tasks, output_size

def instantiate(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, but a UserError raised while building comes out as itself: Hydra would wrap it
    into an InstantiationException with a stack trace, and the user would lose the one-line message."""
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def has_encoder(cfg: DictConfig, modality: str) -> bool:
    return cfg.encoder[modality].get("_target_") is not None


@dataclass
class Data:
    datasets: dict[str, ManifestDataset]  # split -> dataset
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
    train_records = source.records["train"]
    tasks = build_tasks(cfg, train_records, saved)
    tokenizer = None
    if has_encoder(cfg, "text"):
        if saved is not None:
            tokenizer = tokenizer_from_files(saved["tokenizer_files"], origin)
        else:
            texts = [str(record.get("text") or "") for record in train_records]
            tokenizer = instantiate(cfg.encoder.text.tokenizer, texts=texts)
    transform = None
    if has_encoder(cfg, "image"):
        transform = image_transform(cfg)
    max_length = cfg.encoder.text.get("max_length", 64)
    datasets = {
        split: ManifestDataset(source.records[split], source.files[split], source.image_root, tasks, transform,
                               tokenizer, max_length, on_bad_sample=cfg.data.get("on_bad_sample", "error"),
                               check_images=cfg.data.get("check_images", True))
        for split in splits
    }
    return Data(datasets=datasets, tasks=tasks, tokenizer=tokenizer)


def image_transform(cfg: DictConfig) -> ImageTransform:
    """The encoder's own size wins (encoder.image.size, or what its torchvision weights were trained at), then
    data.image_size; null everywhere keeps the files' size."""
    image = cfg.encoder.image
    if image.get("size"):
        return ImageTransform(size=image.size)
    preset = weights_preset(image.name, image.weights) if "weights" in image else None
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
    dataset = SkipModalities(split_data, cached) if cached else split_data
    loads_images = split_data.transform is not None and "image" not in (cached or {})
    workers = loader_workers(cfg.data.num_workers, loads_images, device)
    if training:
        sampler = EpochShuffle(len(dataset), seed, rank, world_size)
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


def build_model(cfg: DictConfig, tasks: list[TaskSpec], tokenizer=None, restoring: bool = False,
                saved_text_config: str | None = None) -> MultiTaskModel:
    """The network. When `restoring` from a checkpoint no pretrained file is read: the architecture comes from
    the config (and `saved_text_config` for a pretrained text model), the weights from the checkpoint."""
    encoders = {}
    if has_encoder(cfg, "image"):
        encoders["image"] = instantiate(cfg.encoder.image, pretrained=not restoring)
    if has_encoder(cfg, "text"):
        encoders["text"] = instantiate(cfg.encoder.text, tokenizer=tokenizer, saved_config=saved_text_config,
                                       pretrained=not restoring)
    fusion = instantiate(cfg.fusion, input_dims={m: e.dim for m, e in encoders.items()})
    shared = instantiate(cfg.mtl, in_dim=fusion.dim, tasks=[task.name for task in tasks])
    heads = {task.name: mlp(shared.dim, list(cfg.tasks[task.name].head_hidden), output_size(task.type, len(task.classes)))
             for task in tasks}
    return MultiTaskModel(encoders, fusion, shared, heads, modality_dropout=dict(cfg.get("modality_dropout") or {}))


def build_optimizer(cfg: DictConfig, model: MultiTaskModel, weighting: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with two learning rates (encoders / the rest); no weight decay on biases and norm weights."""
    encoder_lr = cfg.optim.encoder_lr if cfg.optim.encoder_lr is not None else cfg.optim.lr
    groups = {}
    named = [(name, p, encoder_lr if name.startswith("encoders.") else cfg.optim.lr)
             for name, p in model.named_parameters()]
    named += [(f"weighting.{name}", p, cfg.optim.lr) for name, p in weighting.named_parameters()]
    for name, parameter, lr in named:
        if not parameter.requires_grad:
            continue
        decay = cfg.optim.weight_decay if parameter.ndim >= 2 else 0.0
        groups.setdefault((lr, decay), []).append(parameter)
    return torch.optim.AdamW([{"params": params, "lr": lr, "weight_decay": decay}
                              for (lr, decay), params in groups.items()], betas=tuple(cfg.optim.betas))


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """A LambdaLR stepped every optimizer step: constant, or linear warm-up then cosine decay."""
    if cfg.sched.name == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if cfg.sched.name != "cosine":
        raise UserError(f"sched.name={cfg.sched.name!r} is not known; use sched=none or sched=cosine")
    warmup = int(cfg.sched.warmup_ratio * total_steps)
    floor = cfg.sched.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_weighting(cfg: DictConfig) -> torch.nn.Module:
    """The loss weighting of conf/loss/*.yaml; an option it does not take is refused now, naming those it takes."""
    try:
        return instantiate(cfg.loss, task_weights={name: float(task.weight) for name, task in cfg.tasks.items()})
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, TypeError) and "unexpected keyword argument" in str(cause):
            target = get_method(cfg.loss._target_)
            known = [name for name in inspect.signature(target).parameters if name not in ("self", "task_weights")]
            unknown = str(cause).rsplit("argument", 1)[-1].strip(" '")
            raise UserError(f"loss.{unknown} is not an option of loss={cfg.loss.get('method', cfg.loss._target_)}; "
                            f"it takes {known}") from None
        raise
