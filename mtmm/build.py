"""Config -> objects, one component at a time: model, optimizer, scheduler, loss weighting (the data side is
mtmm/data/build.py)."""

import inspect
import math
import re

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_method
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig

from mtmm.errors import UserError
from mtmm.models.mlp import mlp
from mtmm.models.model import MultiTaskModel
from mtmm.tasks import TaskSpec, output_size


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


def build_model(cfg: DictConfig, tasks: list[TaskSpec], tokenizer=None, checkpoint: dict | None = None) -> MultiTaskModel:
    """The network. When restoring from a `checkpoint` (its contents) no pretrained file is read: the architecture
    comes from the config (and the checkpoint's text_config / image_config for a Hugging Face encoder), the weights
    from the checkpoint."""
    restoring = checkpoint is not None
    saved = lambda modality: checkpoint.get(f"{modality}_config") if restoring else None  # noqa: E731
    encoders = {}
    if has_encoder(cfg, "image"):
        extra = {"saved_config": saved("image")} if saved("image") is not None else {}  # a Hugging Face encoder
        encoders["image"] = instantiate(cfg.encoder.image, pretrained=not restoring, **extra)
    if has_encoder(cfg, "text"):
        encoders["text"] = instantiate(cfg.encoder.text, tokenizer=tokenizer, saved_config=saved("text"),
                                       pretrained=not restoring)
    fusion = instantiate(cfg.fusion, input_dims={m: e.dim for m, e in encoders.items()})
    shared = instantiate(cfg.mtl, in_dim=fusion.dim, tasks=[task.name for task in tasks])
    heads = {task.name: mlp(shared.dim, list(cfg.tasks[task.name].head_hidden), output_size(task.type, len(task.classes)))
             for task in tasks}
    return MultiTaskModel(encoders, fusion, shared, heads, modality_dropout=dict(cfg.get("modality_dropout") or {}))


def build_optimizer(cfg: DictConfig, model: MultiTaskModel, weighting: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with two learning rates (encoders / the rest), the encoders' decayed layer by layer with
    optim.layer_decay; no weight decay on biases and norm weights."""
    encoder_lr = cfg.optim.encoder_lr if cfg.optim.encoder_lr is not None else cfg.optim.lr
    scales = layer_scales([name for name, _ in model.named_parameters()], cfg.optim.get("layer_decay"))
    groups = {}
    named = [(name, p, encoder_lr * scales.get(name, 1.0) if name.startswith("encoders.") else cfg.optim.lr)
             for name, p in model.named_parameters()]
    named += [(f"weighting.{name}", p, cfg.optim.lr) for name, p in weighting.named_parameters()]
    for name, parameter, lr in named:
        if not parameter.requires_grad:
            continue
        decay = cfg.optim.weight_decay if parameter.ndim >= 2 else 0.0
        groups.setdefault((lr, decay), []).append(parameter)
    return torch.optim.AdamW([{"params": params, "lr": lr, "weight_decay": decay}
                              for (lr, decay), params in groups.items()], betas=tuple(cfg.optim.betas))


BLOCK = re.compile(r"\.(?:layer|layers|blocks|stages|resblocks)\.(\d+)\.")  # transformer blocks, as libraries name them
EMBEDDING = re.compile(r"embed|cls_token|pos_|register_tokens|mask_token|stem")


def layer_scales(names: list[str], decay: float | None) -> dict[str, float]:
    """parameter name -> its learning-rate factor under layer-wise decay (BEiT, ELECTRA): in an encoder with L
    blocks, block i (from 0) gets decay^(L - i), the embeddings decay^(L + 1), what follows the blocks (final norm,
    pooler, mtmm's norm) 1. Encoders without numbered blocks (the small CNN) are left at 1."""
    if decay is None:
        return {}
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
        raise UserError(f"optim.layer_decay={decay!r}; use a number in (0, 1] (e.g. 0.75), or null")
    scales = {}
    for modality in {name.split(".")[1] for name in names if name.startswith("encoders.")}:
        own = [name for name in names if name.startswith(f"encoders.{modality}.")]
        blocks = {name: int(match.group(1)) for name in own if (match := BLOCK.search(name))}
        if not blocks:
            continue
        count = max(blocks.values()) + 1
        for name in own:
            if name in blocks:
                scales[name] = decay ** (count - blocks[name])
            elif EMBEDDING.search(name.split(".", 2)[2]):
                scales[name] = decay ** (count + 1)
    return scales


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
