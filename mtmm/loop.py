"""The training loop and evaluation, readable top to bottom."""

import logging
import math
import signal
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from mtmm import conflict
from mtmm.calibration import calibration_metrics
from mtmm.device import autocast
from mtmm.distributed import Rank, average_gradients, gather, mean_across_ranks, no_sync
from mtmm.ema import scored
from mtmm.errors import UserError
from mtmm.metrics import mean_over_tasks, task_metrics
from mtmm.tasks import TaskSpec, masked_task_loss
from mtmm.weighting.combine import add_partials

log = logging.getLogger("mtmm")


def to_device(batch, device: torch.device):
    """Every tensor in a (nested) batch dict onto `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch


class Stop(Exception):
    """SIGTERM or SIGINT asked the run to stop; raised once the checkpoint that resuming needs is written."""


@dataclass
class Outputs:
    """Everything the model predicted on one split, in dataset order."""

    index: torch.Tensor  # [N] dataset indices
    logits: dict[str, torch.Tensor]  # task -> [N, outputs] float32
    targets: dict[str, torch.Tensor]  # task -> [N]
    mask: dict[str, torch.Tensor]  # task -> [N] bool, False where the sample has no label


@torch.no_grad()
def predict(model, loader, device: torch.device, precision: str, stop_requested=lambda: False) -> Outputs:
    """The model's outputs on every batch of `loader`; raises Stop between batches once stop_requested() is true."""
    model.eval()
    parts = []
    for batch in loader:
        if stop_requested():
            raise Stop()
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


def score(outputs: Outputs, tasks: list[TaskSpec]) -> dict[str, dict[str, float]]:
    """Per-task metrics over the labelled samples (plus the count and the loss), and their mean over tasks."""
    metrics = {}
    for task in tasks:
        mask = outputs.mask[task.name]
        logits, targets = outputs.logits[task.name][mask], outputs.targets[task.name][mask]
        if task.type == "regression":  # metrics in the target's own units, not the standardised ones
            logits, targets = logits * task.std + task.mean, targets * task.std + task.mean
        else:
            logits = logits / task.temperature
        values = task_metrics(task.type, logits.squeeze(-1) if task.type in ("binary", "regression") else logits,
                              targets)
        metrics[task.name] = {name: values[name] for name in task.metrics}
        if task.type != "regression":  # how far its probabilities can be trusted, whatever metrics are configured
            metrics[task.name].update(calibration_metrics(task.type, logits, targets))
        metrics[task.name]["loss"] = masked_task_loss(task.type, outputs.logits[task.name], outputs.targets[task.name],
                                                      mask).item()
        metrics[task.name]["count"] = int(mask.sum())
    metrics["mean"] = mean_over_tasks({name: {k: v for k, v in m.items() if k != "count"}
                                       for name, m in metrics.items()})
    return metrics


def evaluate(model, loader, tasks: list[TaskSpec], device, precision, rank: Rank = Rank(),
             stop_requested=lambda: False) -> tuple[dict, Outputs]:
    """Metrics of a split; under distributed training every rank predicts its share and all ranks score the whole.
    A stop asked for on the way (SIGTERM, Ctrl-C) raises Stop."""
    outputs = merge(gather(predict(model, loader, device, precision, stop_requested), rank))
    return score(outputs, tasks), outputs


def merge(parts: list[Outputs]) -> Outputs:
    """Outputs of several ranks -> one, in dataset order."""
    if len(parts) == 1:
        return parts[0]
    index = torch.cat([p.index for p in parts])
    order = index.argsort()
    join = lambda field: {t: torch.cat([getattr(p, field)[t] for p in parts])[order] for t in parts[0].logits}  # noqa: E731
    return Outputs(index=index[order], logits=join("logits"), targets=join("targets"), mask=join("mask"))


def monitored(metrics: dict[str, dict], monitor: str) -> float:
    """`val/<task or mean>/<metric>` -> its value in a {split: metrics} dict."""
    split, task, name = monitor.split("/")
    return metrics[split][task][name]


def improved(value: float, best: float | None, mode: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if mode == "max" else value < best


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a resumed run continues exactly here."""

    epoch: int = 1  # the epoch in progress (1-based)
    batch: int = 0  # batches of that epoch already trained on
    step: int = 0  # optimizer steps so far
    best: dict = field(default_factory=lambda: {"epoch": None, "value": None, "val": None})
    best_per_task: dict = field(default_factory=dict)  # task -> {"epoch", "metric", "value", "val"} of its best epoch
    conflicts: dict = field(default_factory=dict)  # task pair -> running totals of gradient conflict (conflict.py)
    last_val: dict | None = None  # validation metrics of the last finished epoch
    skipped_nonfinite: int = 0  # batches skipped for a non-finite loss (trainer.on_nonfinite=skip)


LOWER_IS_BETTER = ("loss", "mae", "rmse", "ece", "brier")


def improved_tasks(tasks: list[TaskSpec], val_metrics: dict, progress: Progress, epoch: int) -> list[str]:
    """The tasks whose own headline metric (their first configured one) is the best so far this epoch; their entry
    in progress.best_per_task is updated."""
    better = []
    for task in tasks:
        metric = task.metrics[0] if task.metrics else "loss"
        value = val_metrics[task.name][metric]
        mode = "min" if metric in LOWER_IS_BETTER else "max"
        if improved(value, progress.best_per_task.get(task.name, {}).get("value"), mode):
            progress.best_per_task[task.name] = {"epoch": epoch, "metric": metric, "value": value,
                                                 "val": val_metrics[task.name]}
            better.append(task.name)
    return better


def fit(run, metrics_log, save, progress: Progress, stop_requested=lambda: False) -> Progress:
    """Train `run` (see run.py) from `progress` to the end of cfg.trainer.epochs, validating after every epoch.

    `save(tag, progress)` writes checkpoints/<tag>.pt: "last" every cfg.trainer.checkpoint_every steps and at every
    epoch end, "best" when the monitored metric improves, and with cfg.trainer.keep_best_per_task "best-<task>" when
    that task's own first metric does. When `stop_requested()` turns true, the current step
    finishes, "last" is written and Stop is raised. Under distributed training only rank 0 writes (save and
    metrics_log are no-ops elsewhere).
    """
    cfg, model, weighting, rank = run.cfg, run.model, run.weighting, run.rank
    train_loader = run.loaders["train"]
    while progress.epoch <= cfg.trainer.epochs:
        epoch = progress.epoch
        model.train()
        weighting.train()
        train_loader.sampler.set_epoch(epoch, start=progress.batch * train_loader.batch_size)
        started, seen, total = time.perf_counter(), 0, None
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{cfg.trainer.epochs}", leave=False,
                   disable=None if cfg.trainer.progress else True, dynamic_ncols=True)
        # trainer.grad_accum_steps batches make one optimizer step; at the epoch's end a shorter group steps anyway,
        # so that every checkpoint (written only between optimizer steps) lies on a group boundary and resumes exactly.
        for group in groups(bar, cfg.trainer.get("grad_accum_steps", 1)):
            stepped = train_step(run, group, progress)
            if stepped is None:  # skipped: a non-finite loss under trainer.on_nonfinite=skip
                continue
            total, losses, measured = stepped
            if measured is not None:
                metrics_log.write(step=progress.step, epoch=epoch, split="conflict", **measured)
            seen += sum(len(batch["index"]) for batch in group)
            rate = seen / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{total.item():.4f}", samples_per_s=f"{rate:.0f}")
            if progress.step % cfg.trainer.log_every == 0:
                logged = mean_across_ranks({"total": total.item(), **{t: l.item() for t, l in losses.items()}}, rank)
                metrics_log.write(step=progress.step, epoch=epoch, split="train", loss=logged["total"],
                                  **{task: {"loss": logged[task]} for task in losses},
                                  weights=weighting.weights(), lr=run.scheduler.get_last_lr()[0], samples_per_s=rate)
            if stop_requested():
                save("last", progress)
                raise Stop()
            if cfg.trainer.checkpoint_every and progress.step % cfg.trainer.checkpoint_every == 0:
                save("last", progress)
        bar.close()
        weighting.end_epoch()

        val_metrics, _ = evaluate(scored(run), run.loaders["val"], run.data.tasks, run.device, cfg.device.precision,
                                  rank)
        metrics_log.write(step=progress.step, epoch=epoch, split="val", **val_metrics)
        value = monitored({"val": val_metrics}, cfg.trainer.monitor)
        log.info("epoch %d/%d  step %d  train loss %s  val %s  %s=%.4f", epoch, cfg.trainer.epochs, progress.step,
                 f"{total.item():.4f}" if total is not None else "-", brief(val_metrics), cfg.trainer.monitor, value)
        progress.epoch, progress.batch, progress.last_val = epoch + 1, 0, val_metrics
        better = improved_tasks(run.data.tasks, val_metrics, progress, epoch)  # before any save: one state for all
        if improved(value, progress.best["value"], cfg.trainer.monitor_mode):
            progress.best = {"epoch": epoch, "value": value, "val": val_metrics}
            save("best", progress)
        for task in better if cfg.trainer.get("keep_best_per_task") else ():
            save(f"best-{task}", progress)
        save("last", progress)  # after best.pt: a crash in between redoes nothing that last.pt says is done
        if stop_requested():
            raise Stop()
    return progress


def groups(batches, size: int):
    """Consecutive lists of `size` batches; the last may be shorter."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def train_step(run, batches: list[dict] | dict, progress: Progress
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict | None] | None:
    """One optimizer step on `batches` (trainer.grad_accum_steps micro-batches, or one batch dict): per micro-batch
    forward, per-task masked losses, the weighting's total, backward of total / N (or, for a gradient-combining
    weighting, its per-task gradients); then clipping, step, scheduler step. Returns the mean total and per-task
    losses over the micro-batches, and on every trainer.log_conflict_every-th step the tasks' gradient norms and
    cosines of the first micro-batch (conflict.py); or None when non-finite losses made it skip every micro-batch
    (trainer.on_nonfinite=skip; a skipped micro-batch adds nothing); stops the run on one otherwise.

    Accumulation: loss-based weightings are called on each micro-batch's losses, and total / N is backpropagated,
    which is exactly the weighting of the mean loss for static and uncertainty weighting (linear in the losses);
    a method that updates its state when called (RLW's draw, FAMO, GradNorm, DWA's tallies) does so per
    micro-batch. Gradient-combining methods on the parameters accumulate the per-task gradients over the N
    micro-batches and combine them once (as one batch N times larger would); on the representation, whose rows
    belong to one micro-batch's samples, each micro-batch is combined by itself and the updates averaged.

    Under DDP the reducer averages only the last micro-batch's backward (no_sync before); gradient-combining
    methods never use the reducer: they average their per-task gradients across processes themselves (combine.py).
    """
    cfg, model, weighting, optimizer, scaler = run.cfg, run.model, run.weighting, run.optimizer, run.scaler
    batches = [batches] if isinstance(batches, dict) else batches
    n = len(batches)
    combining = weighting.combines_gradients
    per_step = combining and getattr(weighting, "combines_once_per_step", False)
    optimizer.zero_grad(set_to_none=True)
    partial, totals, task_losses, measured = None, [], [], None
    for i, batch in enumerate(batches):
        with no_sync(run.forward, skip=combining or i < n - 1):
            batch = to_device(batch, run.device)
            with autocast(run.device, cfg.device.precision):
                logits = run.forward(batch)
                losses = {task.name: masked_task_loss(task.type, logits[task.name], batch["targets"][task.name],
                                                      batch["target_mask"][task.name]) for task in run.data.tasks}
                total = weighting(losses,
                                  shared=model.last_shared_parameters() if weighting.needs_shared_parameters else None)
            progress.batch += 1
            bad = [task for task, loss in losses.items() if not torch.isfinite(loss)]
            if bad and cfg.trainer.on_nonfinite == "skip":
                progress.skipped_nonfinite += 1
                log.warning("skipped batch %d of epoch %d: non-finite loss of %s", progress.batch, progress.epoch, bad)
                continue
            if bad:
                raise UserError(f"the loss of task {bad[0]!r} is {losses[bad[0]].item()} at step {progress.step + 1} "
                                f"(epoch {progress.epoch}); lower optim.lr, check the data, or set "
                                f"trainer.on_nonfinite=skip; the last good checkpoint is kept")
            every = cfg.trainer.get("log_conflict_every") or 0
            if every and measured is None and (progress.step + 1) % every == 0:
                measured = conflict.measure(losses, model, cfg.trainer.get("conflict_on", "parameters"))
                conflict.tally(progress.conflicts, measured)
            if per_step:  # per-task gradients summed over the micro-batches, combined once below
                partial = add_partials(partial, weighting.collect(losses, model))
            elif combining:
                weighting.backward(losses, model, **({"scale": 1 / n} if n > 1 else {}))
            else:
                scaler.scale(total / n).backward()  # / 1 is exact: without accumulation nothing changes
            totals.append(total.detach())
            task_losses.append({task: loss.detach() for task, loss in losses.items()})
    if not totals:
        return None
    if per_step:
        weighting.apply(partial, model, scale=len(totals) / n)  # apply() averages over the micro-batches it got
    # The weighting's own parameters (Uncertainty's log-variances) are outside the DDP module: averaged here, as DDP
    # averages the model's, or each process would learn its own weights
    average_gradients(weighting.parameters())
    if cfg.trainer.grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.trainer.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    if run.ema is not None:
        run.ema.update_parameters(model)
    run.scheduler.step()
    progress.step += 1
    mean = lambda values: values[0] if len(values) == 1 else torch.stack(values).mean()  # noqa: E731
    return mean(totals), {task: mean([l[task] for l in task_losses]) for task in task_losses[0]}, measured


class StopSignal:
    """SIGTERM / SIGINT (preemption, Ctrl-C): note it, let the step finish, then checkpoint and stop."""

    def __init__(self):
        self.name = None
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread (e.g. some notebook runners): no graceful stop there
                pass

    def handle(self, signum, frame) -> None:
        self.name = signal.Signals(signum).name

    def requested(self) -> bool:
        return self.name is not None

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def brief(metrics: dict[str, dict]) -> str:
    """One line of the headline metric of every task, for the log."""
    parts = []
    for task, values in metrics.items():
        if task != "mean":
            name = next(iter(values))
            parts.append(f"{task} {name} {values[name]:.4f}")
    return ", ".join(parts)
