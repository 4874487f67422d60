"""Experiment trackers fed from the same records as metrics.jsonl (which stays the source of truth).

A tracker is built from its `logger.<name>` config (`_target_` + options) as
`Tracker(run_dir=..., config=..., resume=..., **options)` and has `log(record, index)`, `finish(summary)` and
`close()`. `index` is the record's line number in metrics.jsonl. On resume `Resume` says which (name, step) points
the trackers already received before the run stopped: metrics.jsonl is cut back to the checkpoint and the records
after it are written again (with the same values on the CPU), so append-only trackers skip the points they hold and
no step is logged twice. Only rank 0 builds trackers.
"""

import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mtmm.errors import UserError


@dataclass
class Resume:
    step: int   # the checkpoint's optimizer step: records after it are written again
    kept: int   # records of metrics.jsonl kept (written before the checkpoint)
    sent: set[tuple[str, int]] = field(default_factory=set)  # (name, step) points the trackers already hold


def points(path: Path) -> set[tuple[str, int]]:
    """Every (name, step) a metrics.jsonl's records gave the trackers: what they hold when a run is resumed."""
    out, last = set(), 0
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a kill: the trackers may or may not have it; it is written again
            continue
        step = record_step(record, last)
        last = max(last, step)
        out.update((name, step) for name in scalars(record))
    return out


def require(module: str, extra: str):
    """Import `module` or stop with one line naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"logger={extra} needs the {module.split('.')[0]} package: pip install \"mtmm[{extra}]\"") \
            from None


def check_trackers(logger_cfg) -> None:
    """Each configured tracker's package is installed (else one line naming the extra)."""
    needs = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
    for name, options in (logger_cfg or {}).items():
        module = str((options or {}).get("_target_", "")).split(".")
        if len(module) > 2 and module[:2] == ["mtmm", "loggers"] and module[2] in needs:
            require(needs[module[2]], needs[module[2]])


def record_step(record: dict, last_step: int) -> int:
    """The step a record is logged at: its own, or (test records have none) the last step of the run."""
    step = record.get("step")
    return last_step if step is None else int(step)


def scalars(record: dict) -> dict[str, float]:
    """The numbers of one record under slash-joined names: train/loss, train/img/loss, train/weights/img, train/lr,
    val/img/accuracy, test/best/img/accuracy, conflict/cosine/img-txt, ..."""
    prefix = record["split"] + (f"/{record['checkpoint']}" if record.get("checkpoint") else "")
    out = {}

    def walk(name: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{name}/{str(key).replace('~', '-')}", item)  # MLflow: no ~ in names
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, str) for v in value):
            return
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)) and value is not None and math.isfinite(value):
            out[name] = float(value)

    for key, value in record.items():
        if key not in ("step", "epoch", "split", "checkpoint"):
            walk(f"{prefix}/{key}", value)
    return out


def flat_params(config: dict, prefix: str = "") -> dict[str, object]:
    """The resolved config as flat hyper-parameters: {"optim.lr": 0.001, "fusion._target_": "...", ...}."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, name + "."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def build_trackers(logger_cfg, run_dir, config: dict, resume: Resume | None) -> list:
    """One tracker per entry of cfg.logger (None: none)."""
    trackers = []
    for name, options in (logger_cfg or {}).items():
        options = dict(options)
        target = options.pop("_target_", None)
        if not target or "." not in target:
            raise UserError(f"logger.{name} has no _target_; use one of conf/logger/ (tensorboard, mlflow, wandb, csv)")
        module, _, cls = target.rpartition(".")
        try:
            tracker_class = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError):
            raise UserError(f"logger.{name}._target_={target} cannot be imported") from None
        try:
            trackers.append(tracker_class(run_dir=run_dir, config=config, resume=resume, **options))
        except TypeError as error:
            raise UserError(f"logger.{name}: {error}") from None
    return trackers
