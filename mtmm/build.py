"""Config -> objects, one component at a time: data, model, optimizer, scheduler, loss weighting."""

import math
from dataclasses import dataclass
from functools import partial

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from mtmm.data.collate import collate
from mtmm.data.dataset import ImageTransform, ManifestDataset, TaskSpec, read_jsonl
from mtmm.data.tokenizer import tokenizer_from_files
from mtmm.errors import UserError
from mtmm.models.mlp import mlp
from mtmm.models.model import MultiTaskModel
from mtmm.tasks import TASK_TYPES, output_size

METRICS = {"multiclass": ("accuracy", "macro_f1"), "binary": ("accuracy", "f1", "auroc")}


def has_encoder(cfg: DictConfig, modality: str) -> bool:
    return cfg.encoder[modality].get("_target_") is not None


def build_tasks(cfg: DictConfig) -> list[TaskSpec]:
    """The configured tasks, checked before anything expensive happens."""
    if not cfg.tasks:
        raise UserError("no task is configured; choose a preset such as tasks=img+txt")
    specs = []
    for name, task in cfg.tasks.items():
        if task.type not in TASK_TYPES:
            raise UserError(f"tasks.{name}.type={task.type!r} is not known; use one of {', '.join(TASK_TYPES)}")
        classes = tuple(str(c) for c in task.classes)
        if len(classes) < 2 or (task.type == "binary" and len(classes) != 2):
            raise UserError(f"tasks.{name}.classes={list(classes)}: a {task.type} task needs "
                            f"{'exactly 2' if task.type == 'binary' else 'at least 2'} classes")
        unknown = set(task.metrics) - set(METRICS[task.type])
        if unknown:
            raise UserError(f"tasks.{name}.metrics: {sorted(unknown)} not available for a {task.type} task; "
                            f"choose from {list(METRICS[task.type])}")
        specs.append(TaskSpec(name=name, type=task.type, target=task.target, classes=classes))
    return specs


@dataclass
class Data:
    datasets: dict[str, ManifestDataset]  # split -> dataset
    tasks: list[TaskSpec]
    tokenizer: object | None  # a transformers tokenizer, None without a text encoder


def build_data(cfg: DictConfig, splits: tuple[str, ...] = ("train", "val", "test"),
               tokenizer_files: dict[str, str] | None = None) -> Data:
    """Datasets for `splits`. The tokenizer is learnt from the training texts, or rebuilt from a checkpoint's files."""
    if not (has_encoder(cfg, "image") or has_encoder(cfg, "text")):
        raise UserError("both encoder/image and encoder/text are none; configure at least one modality")
    tasks = build_tasks(cfg)
    source = instantiate(cfg.data.source)
    records = {split: read_jsonl(source.manifests[split]) for split in splits}
    tokenizer = None
    if has_encoder(cfg, "text"):
        if tokenizer_files is not None:
            tokenizer = tokenizer_from_files(tokenizer_files)
        else:
            texts = [str(record.get("text") or "") for record in records["train"]]
            tokenizer = instantiate(cfg.encoder.text.tokenizer, texts=texts)
    transform = None
    if has_encoder(cfg, "image"):
        transform = ImageTransform(size=cfg.encoder.image.get("size"))
    max_length = cfg.encoder.text.get("max_length", 64)
    datasets = {
        split: ManifestDataset(records[split], source.manifests[split], source.image_root, tasks, transform,
                               tokenizer, max_length)
        for split in splits
    }
    return Data(datasets=datasets, tasks=tasks, tokenizer=tokenizer)


def build_loader(cfg: DictConfig, data: Data, split: str, seed: int = 0) -> DataLoader:
    """Training shuffles with its own seeded generator (the data order is part of the run's determinism)."""
    training = split == "train"
    pad_id = data.tokenizer.pad_token_id if data.tokenizer is not None else 0
    return DataLoader(
        data.datasets[split],
        batch_size=cfg.data.batch_size if training else cfg.data.eval_batch_size,
        shuffle=training,
        generator=torch.Generator().manual_seed(seed) if training else None,
        num_workers=cfg.data.num_workers,
        collate_fn=partial(collate, pad_id=pad_id),
        drop_last=False,
    )


def build_model(cfg: DictConfig, tokenizer=None, restoring: bool = False,
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
    shared = mlp(fusion.dim, list(cfg.shared.hidden), dropout=cfg.shared.dropout)
    heads = {name: mlp(shared.dim, list(task.head_hidden), output_size(task.type, len(task.classes)))
             for name, task in cfg.tasks.items()}
    return MultiTaskModel(encoders, fusion, shared, heads)


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
    return instantiate(cfg.loss, task_weights={name: float(task.weight) for name, task in cfg.tasks.items()})
