"""The task concept in one place: what a task is (TaskSpec), the checks of its config, the classes and statistics
learnt from the training split, the parsing of a target cell, its output size and its masked loss."""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from mtmm.data.readers import FILE, LINE, columns_of, source_of
from mtmm.errors import UserError

TASK_TYPES = ("multiclass", "binary", "multilabel", "regression")
METRICS = {"multiclass": ("accuracy", "macro_f1"), "binary": ("accuracy", "f1", "auroc"),
           "multilabel": ("micro_f1", "macro_f1", "map"), "regression": ("mae", "rmse", "r2")}


@dataclass(frozen=True)
class TaskSpec:
    """One task: what it predicts from which column, its classes (or regression statistics) and its metrics."""

    name: str
    type: str  # multiclass | binary | multilabel | regression
    target: str  # manifest column
    classes: tuple[str, ...] = ()  # class (or label) names in index order; empty for regression
    delimiter: str = "|"  # multilabel cells given as one string: "drama|comedy"
    mean: float = 0.0  # regression targets are standardised as (y - mean) / std for training
    std: float = 1.0
    metrics: tuple[str, ...] = ()  # what is reported for it (a subset of METRICS[type])
    temperature: float = 1.0  # classification logits are divided by it (mtmm-eval calibrate=true fits it)


def check_tasks(cfg: DictConfig) -> None:
    """Task types, class lists and metric names, checked before anything expensive happens."""
    if not cfg.tasks:
        raise UserError("no task is configured; choose a preset such as tasks=img+txt")
    for name, task in cfg.tasks.items():
        if task.type not in TASK_TYPES:
            raise UserError(f"tasks.{name}.type={task.type!r} is not known; use one of {', '.join(TASK_TYPES)}")
        classes = task.get("classes")
        if classes is not None and task.type != "regression" and (
                len(classes) < 2 or (task.type == "binary" and len(classes) != 2)):
            raise UserError(f"tasks.{name}.classes={list(classes)}: a {task.type} task needs "
                            f"{'exactly 2' if task.type == 'binary' else 'at least 2'} classes")
        unknown = set(task.metrics) - set(METRICS[task.type])
        if unknown:
            raise UserError(f"tasks.{name}.metrics: {sorted(unknown)} not available for a {task.type} task; "
                            f"choose from {list(METRICS[task.type])}")


def build_tasks(cfg: DictConfig, train_records: list[dict] | None, saved: dict | None = None) -> list[TaskSpec]:
    """TaskSpecs with their class names and regression statistics: from the config, else from a checkpoint
    (`saved`), else learnt from the training records (sorted class names; mean and std of the targets)."""
    check_tasks(cfg)
    specs = []
    for name, task in cfg.tasks.items():
        spec = TaskSpec(name=name, type=task.type, target=task.target, delimiter=task.get("delimiter", "|"),
                        metrics=tuple(task.metrics))
        if saved is not None:
            spec = replace(spec, classes=tuple(saved["classes"][name]), mean=saved["stats"][name][0],
                           std=saved["stats"][name][1], temperature=(saved.get("calibration") or {}).get(name, 1.0))
        elif task.type == "regression":
            if task.get("standardize", False):
                spec = replace(spec, **target_statistics(spec, train_records))
        elif task.get("classes") is not None:
            spec = replace(spec, classes=tuple(str(c) for c in task.classes))
        else:
            spec = replace(spec, classes=infer_classes(spec, train_records))
        specs.append(spec)
    return specs


def infer_classes(task: TaskSpec, records: list[dict]) -> tuple[str, ...]:
    """The class (or label) names seen in the training split, sorted (numerically when they are all integers)."""
    names = set()
    for record in records:
        value = record.get(task.target)
        if value is None or value == "":
            continue
        if task.type == "multilabel":
            parts = value if isinstance(value, list) else str(value).split(task.delimiter)
            names.update(str(part).strip() for part in parts if str(part).strip())
        else:
            names.add(str(int(value)) if isinstance(value, bool) else str(value))
    if not names:
        raise no_labels(task, records)  # which file lacks the column, or has it empty
    if all(name.lstrip("-").isdigit() for name in names):
        ordered = tuple(sorted(names, key=int))
    else:
        ordered = tuple(sorted(names))
    need = 2 if task.type != "multilabel" else 1
    if len(ordered) < need or (task.type == "binary" and len(ordered) != 2):
        raise UserError(f"{source_of(records)}: task {task.name!r} has only the labels {list(ordered)} in column "
                        f"{task.target!r} of the training rows; a {task.type} task needs "
                        f"{'exactly 2' if task.type == 'binary' else need} (or set tasks.{task.name}.classes)")
    return ordered


def target_statistics(task: TaskSpec, records: list[dict]) -> dict:
    """Mean and std of a regression target over the training split (what standardisation divides by)."""
    values = [parse_target(task, record.get(task.target), f"{record.get(FILE) or 'training split'}, line "
                                                         f"{record.get(LINE)}, column {task.target!r}")
              for record in records]
    values = [v for v in values if v is not None]
    if not values:
        raise no_labels(task, records)
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return {"mean": mean, "std": std if std > 0 else 1.0}


def no_labels(task: TaskSpec, records: list[dict]) -> UserError:
    """The training records give a task nothing to learn from: say which file lacks the column or the labels."""
    where, present = source_of(records), columns_of(records)
    if task.target not in present:
        return UserError(f"{where}: no column {task.target!r} (the target of task {task.name!r}; set "
                         f"tasks.{task.name}.target); the file has {sorted(present)}")
    return UserError(f"{where}: no row has a label in column {task.target!r} (the target of task {task.name!r}); "
                     f"every cell of it is empty")


def parse_target(task: TaskSpec, value, where: str):
    """A raw cell -> the training target (class index, multi-hot list or standardised float); None = no label."""
    if value is None or value == "":
        return None
    if task.type == "regression":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: {value!r} is not a number (task {task.name!r} is a regression)") from None
        if not math.isfinite(number):
            raise UserError(f"{where}: regression target {value!r} of task {task.name!r} is not finite; "
                            f"leave the cell empty for 'no label'")
        return (number - task.mean) / task.std
    if task.type == "multilabel":
        names = value if isinstance(value, list) else [part.strip() for part in str(value).split(task.delimiter)]
        hot = [0.0] * len(task.classes)
        for name in names:
            if name == "":
                continue
            hot[class_index(task, name, where)] = 1.0
        return hot
    return class_index(task, value, where)


def class_index(task: TaskSpec, value, where: str) -> int:
    """A class name, an integer or an integer-valued string -> the class index."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, str) and value in task.classes:
        return task.classes.index(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int):
        if 0 <= value < len(task.classes):
            return value
        raise UserError(f"{where}: label {value} of task {task.name!r} is out of range 0..{len(task.classes) - 1}")
    raise UserError(f"{where}: label {value!r} of task {task.name!r} is not one of its classes {list(task.classes)} "
                    f"(or an index 0..{len(task.classes) - 1})")


def placeholder(task: TaskSpec):
    return [0.0] * len(task.classes) if task.type == "multilabel" else 0.0 if task.type == "regression" else 0


def output_size(task_type: str, num_classes: int) -> int:
    """Binary and regression tasks predict one value; multiclass one logit per class, multilabel one per label."""
    return 1 if task_type in ("binary", "regression") else num_classes


def masked_task_loss(task_type: str, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean loss over the samples that have a label for this task; exactly 0 (with a graph) when none has.

    multiclass: cross-entropy; binary and multilabel: binary cross-entropy on logits (mean over labels too);
    regression: mean squared error on standardised targets."""
    if not mask.any():
        return logits.sum() * 0.0
    logits, targets = logits[mask].float(), targets[mask]
    if task_type == "binary":
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), targets.float())
    if task_type == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, targets.float())
    if task_type == "regression":
        return F.mse_loss(logits.squeeze(-1), targets.float())
    return F.cross_entropy(logits, targets)
