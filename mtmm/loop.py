"""The training loop and evaluation, readable top to bottom."""

import logging
import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from mtmm.data.dataset import TaskSpec
from mtmm.device import autocast
from mtmm.errors import UserError
from mtmm.metrics import mean_over_tasks, task_metrics
from mtmm.tasks import masked_task_loss

log = logging.getLogger("mtmm")


def to_device(batch, device: torch.device):
    """Every tensor in a (nested) batch dict onto `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch


@dataclass
class Outputs:
    """Everything the model predicted on one split, in dataset order."""

    index: torch.Tensor  # [N] dataset indices
    logits: dict[str, torch.Tensor]  # task -> [N, outputs] float32
    targets: dict[str, torch.Tensor]  # task -> [N]
    mask: dict[str, torch.Tensor]  # task -> [N] bool, False where the sample has no label


@torch.no_grad()
def predict(model, loader, device: torch.device, precision: str) -> Outputs:
    model.eval()
    parts = []
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, precision):
            logits = model(batch)
        parts.append((batch["index"].cpu(), {t: v.float().cpu() for t, v in logits.items()},
                      {t: v.cpu() for t, v in batch["targets"].items()}, {t: v.cpu() for t, v in batch["target_mask"].items()}))
    tasks = parts[0][1].keys()
    return Outputs(
        index=torch.cat([p[0] for p in parts]),
        logits={t: torch.cat([p[1][t] for p in parts]) for t in tasks},
        targets={t: torch.cat([p[2][t] for p in parts]) for t in tasks},
        mask={t: torch.cat([p[3][t] for p in parts]) for t in tasks},
    )


def score(outputs: Outputs, tasks: list[TaskSpec], wanted: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Per-task metrics over the labelled samples (plus the count and the loss), and their mean over tasks."""
    metrics = {}
    for task in tasks:
        mask = outputs.mask[task.name]
        logits, targets = outputs.logits[task.name][mask], outputs.targets[task.name][mask]
        if task.type == "regression":  # metrics in the target's own units, not the standardised ones
            logits, targets = logits * task.std + task.mean, targets * task.std + task.mean
        values = task_metrics(task.type, logits.squeeze(-1) if task.type in ("binary", "regression") else logits,
                              targets)
        metrics[task.name] = {name: values[name] for name in wanted[task.name]}
        metrics[task.name]["loss"] = masked_task_loss(task.type, outputs.logits[task.name], outputs.targets[task.name],
                                                      mask).item()
        metrics[task.name]["count"] = int(mask.sum())
    metrics["mean"] = mean_over_tasks({name: {k: v for k, v in m.items() if k != "count"}
                                       for name, m in metrics.items()})
    return metrics


def evaluate(model, loader, tasks, wanted, device, precision) -> tuple[dict, Outputs]:
    outputs = predict(model, loader, device, precision)
    return score(outputs, tasks, wanted), outputs


def monitored(metrics: dict[str, dict], monitor: str) -> float:
    """`val/<task or mean>/<metric>` -> its value in a {split: metrics} dict."""
    split, task, name = monitor.split("/")
    return metrics[split][task][name]


def improved(value: float, best: float | None, mode: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if mode == "max" else value < best


def fit(model, weighting, optimizer, scheduler, loaders: dict, tasks: list[TaskSpec], wanted: dict, cfg, device,
        metrics_log, save) -> tuple[dict, dict]:
    """Train for cfg.trainer.epochs, validating after every epoch. `save(tag, epoch, step, val_metrics)` writes
    checkpoints/<tag>.pt. Returns the best epoch (its number, monitored value and validation metrics) and the
    last epoch's validation metrics."""
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.device.precision == "fp16" and device.type == "cuda")
    precision = cfg.device.precision
    types = {task.name: task.type for task in tasks}
    step, best = 0, {"epoch": None, "value": None, "val": None}
    for epoch in range(1, cfg.trainer.epochs + 1):
        model.train()
        weighting.train()
        started, seen = time.perf_counter(), 0
        bar = tqdm(loaders["train"], desc=f"epoch {epoch}/{cfg.trainer.epochs}", leave=False,
                   disable=None if cfg.trainer.progress else True, dynamic_ncols=True)
        for batch in bar:
            batch = to_device(batch, device)
            with autocast(device, precision):
                logits = model(batch)
                losses = {task: masked_task_loss(types[task], logits[task], batch["targets"][task],
                                                 batch["target_mask"][task]) for task in types}
                total = weighting(losses, shared=model.last_shared_parameters())
            for task, loss in losses.items():
                if not torch.isfinite(loss):
                    raise UserError(f"the loss of task {task!r} is {loss.item()} at step {step + 1} (epoch {epoch}); "
                                    f"lower optim.lr or check the data; the last good checkpoint is kept")
            optimizer.zero_grad(set_to_none=True)
            if getattr(weighting, "combines_gradients", False):
                weighting.backward(losses, model)  # per-task gradients -> one combined update in .grad
            else:
                scaler.scale(total).backward()
            if cfg.trainer.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                               cfg.trainer.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            seen += len(batch["index"])
            rate = seen / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{total.item():.4f}", samples_per_s=f"{rate:.0f}")
            if step % cfg.trainer.log_every == 0:
                metrics_log.write(step=step, epoch=epoch, split="train", loss=total.item(),
                                  **{task: {"loss": loss.item()} for task, loss in losses.items()},
                                  weights=weighting.weights(), lr=scheduler.get_last_lr()[0], samples_per_s=rate)
        bar.close()
        weighting.end_epoch()

        val_metrics, _ = evaluate(model, loaders["val"], tasks, wanted, device, precision)
        metrics_log.write(step=step, epoch=epoch, split="val", **val_metrics)
        value = monitored({"val": val_metrics}, cfg.trainer.monitor)
        log.info("epoch %d/%d  step %d  %.0f samples/s  train loss %.4f  val %s  %s=%.4f", epoch, cfg.trainer.epochs,
                 step, rate, total.item(), brief(val_metrics), cfg.trainer.monitor, value)
        save("last", epoch, step, val_metrics)
        if improved(value, best["value"], cfg.trainer.monitor_mode):
            best = {"epoch": epoch, "value": value, "val": val_metrics}
            save("best", epoch, step, val_metrics)
    return best, val_metrics


def brief(metrics: dict[str, dict]) -> str:
    """One line of the headline metric of every task, for the log."""
    parts = []
    for task, values in metrics.items():
        if task != "mean":
            name = next(iter(values))
            parts.append(f"{task} {name} {values[name]:.4f}")
    return ", ".join(parts)
