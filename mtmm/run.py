"""What a training run is made of, built one component at a time: `setup(cfg, resume, rank) -> Run`.

mtmm-train, scripts/bench.py and tests build a run the same way, so what they measure is what users run.
"""

import logging
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from mtmm.build import build_model, build_optimizer, build_scheduler, build_weighting
from mtmm.data.build import Data, build_data, build_loader
from mtmm.device import resolve_device
from mtmm.distributed import Rank
from mtmm.ema import build_ema, check_decay
from mtmm.errors import UserError
from mtmm.cache.features import feature_caches
from mtmm.cache.images import attach_image_caches
from mtmm.models.model import MultiTaskModel
from mtmm.models.presets import fill_image_preprocessing
from mtmm.weighting.protocol import Weighting, check_weighting

log = logging.getLogger("mtmm")


@dataclass
class Run:
    cfg: DictConfig
    device: torch.device
    rank: Rank
    data: Data
    model: MultiTaskModel
    forward: torch.nn.Module  # what a step calls: the model, or its DistributedDataParallel / compiled wrapper
    weighting: Weighting  # an nn.Module (mtmm/weighting/protocol.py)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loaders: dict[str, DataLoader]  # split -> loader
    paths: dict[str, Path] = field(default_factory=dict)  # checkpoint tag (last, best) -> file, when in a run folder
    ema: AveragedModel | None = None  # trainer.ema: the moving average of the weights that validation scores


def setup(cfg: DictConfig, resume: dict | None = None, rank: Rank = Rank(), run_dir: Path | None = None,
          splits: tuple[str, ...] = ("train", "val", "test")) -> Run:
    """Check the config, seed, and build the run's parts in the order their random numbers are drawn. With `resume`
    (a checkpoint's contents) the data side and the architecture come from it; its weights and optimizer state are
    put in place by checkpoint.restore, except that frozen encoders get theirs now (they key the feature cache)."""
    check_monitor(cfg)
    if resume is None:  # a resumed run's config has them already, from the files read when it started
        fill_image_preprocessing(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device.type)
    if device.type == "cuda" and rank.world_size > 1:
        device = torch.device("cuda", rank.local_rank)
    log.info("run folder %s, device %s, precision %s%s", run_dir, device, cfg.device.precision,
             f", {rank.world_size} processes" if rank.world_size > 1 else "")

    data = build_data(cfg, splits=splits, saved=resume["data"] if resume else None)
    model = build_model(cfg, data.tasks, data.tokenizer, checkpoint=resume).to(device)
    cached = {}
    if cfg.trainer.get("feature_cache"):
        if resume is not None:  # the frozen encoders' restored weights key the cache, not their fresh ones
            model.load_state_dict(resume["model"])
        cached = feature_caches(cfg, model, data, device, rank)
    attach_image_caches(cfg, data, data.datasets, device, rank, features=cached)
    loaders = {split: build_loader(cfg, data, split, seed=cfg.seed, device=device, rank=rank.rank,
                                   world_size=rank.world_size, cached=cached.get(split)) for split in data.datasets}
    weighting = build_weighting(cfg).to(device)
    check_weighting(cfg, weighting, rank)
    optimizer = build_optimizer(cfg, model, weighting)
    steps_per_epoch = math.ceil(len(loaders["train"]) / cfg.trainer.get("grad_accum_steps", 1))  # optimizer steps
    scheduler = build_scheduler(cfg, optimizer, total_steps=cfg.trainer.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.device.precision == "fp16" and device.type == "cuda")
    forward = model
    if rank.world_size > 1:
        # find_unused_parameters: the 'missing' embeddings get no gradient in a batch where every sample is complete.
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.index is not None else None, find_unused_parameters=True)
    if cfg.trainer.get("compile"):
        forward = torch.compile(forward)
    log.info("%d parameters (%d trainable); splits %s", sum(p.numel() for p in model.parameters()),
             sum(p.numel() for p in model.parameters() if p.requires_grad),
             {split: len(dataset) for split, dataset in data.datasets.items()})
    tags = ["last", "best"] + ([f"best-{task.name}" for task in data.tasks] if cfg.trainer.get("keep_best_per_task") else [])
    paths = {tag: run_dir / "checkpoints" / f"{tag}.pt" for tag in tags} if run_dir else {}
    ema = build_ema(model, cfg.trainer.get("ema"))
    return Run(cfg, device, rank, data, model, forward, weighting, optimizer, scheduler, scaler, loaders, paths, ema)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def check_monitor(cfg: DictConfig) -> None:
    """trainer.monitor must name a validation metric that will exist; say so before training, not after."""
    parts = str(cfg.trainer.monitor).split("/")
    choices = [f"val/{task}/{metric}" for task, spec in cfg.tasks.items() for metric in [*spec.metrics, "loss"]]
    shared = set.intersection(*[set(spec.metrics) | {"loss"} for spec in cfg.tasks.values()]) if cfg.tasks else set()
    choices += [f"val/mean/{metric}" for metric in sorted(shared)]
    if len(parts) != 3 or cfg.trainer.monitor not in choices:
        raise UserError(f"trainer.monitor={cfg.trainer.monitor!r} is not a validation metric of this run; "
                        f"choose one of {choices}")
    if cfg.trainer.get("keep_best_per_task"):
        for task in cfg.tasks:
            if not re.fullmatch(r"[A-Za-z0-9_.+-]+", task) or task.startswith("."):
                raise UserError(f"trainer.keep_best_per_task names files checkpoints/best-<task>.pt: task {task!r} "
                                f"needs a name of letters, digits, _ . + - only")
    if cfg.trainer.get("conflict_on", "parameters") not in ("parameters", "representation"):
        raise UserError(f"trainer.conflict_on={cfg.trainer.conflict_on!r}; use parameters or representation")
    every = cfg.trainer.get("log_conflict_every") or 0
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise UserError(f"trainer.log_conflict_every={every!r}; use a whole number of steps (0: off)")
    check_decay(cfg.trainer.get("ema"))  # before any data is built
    if cfg.trainer.monitor_mode not in ("max", "min"):
        raise UserError(f"trainer.monitor_mode={cfg.trainer.monitor_mode!r}; use max or min")
