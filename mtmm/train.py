"""`mtmm-train`: compose the config with Hydra, train, write the run folder. train(cfg) is a plain function."""

import logging
import random
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mtmm.build import build_data, build_loader, build_model, build_optimizer, build_scheduler, build_weighting
from mtmm.checkpoint import load_checkpoint, save_checkpoint
from mtmm.device import resolve_device
from mtmm.errors import UserError, exit_with
from mtmm.loop import evaluate, fit
from mtmm.records import MetricsLog, write_json

log = logging.getLogger("mtmm")


def train(cfg: DictConfig, run_dir: Path | None = None) -> float:
    """Train one model as `cfg` says, write everything into `run_dir` (Hydra's output dir by default) and return
    the monitored validation metric of the best epoch (what a sweeper optimises)."""
    started = time.time()
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    checkpoints = run_dir / "checkpoints"
    if checkpoints.exists() and any(checkpoints.iterdir()):
        raise UserError(f"{run_dir} already holds a run (checkpoints/ is not empty); mtmm never overwrites one. "
                        f"Pick another folder with hydra.run.dir=...")
    run_dir.mkdir(parents=True, exist_ok=True)
    file_log = attach_log_file(run_dir / "train.log")
    try:
        return _train(cfg, run_dir, started)
    finally:
        if file_log is not None:
            logging.getLogger().removeHandler(file_log)
            file_log.close()


def _train(cfg: DictConfig, run_dir: Path, started: float) -> float:
    check_monitor(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device.type)
    log.info("run folder %s, device %s, precision %s", run_dir, device, cfg.device.precision)

    data = build_data(cfg)
    loaders = {split: build_loader(cfg, data, split, seed=cfg.seed, device=device) for split in data.datasets}
    model = build_model(cfg, data.tasks, data.tokenizer).to(device)
    weighting = build_weighting(cfg).to(device)
    if getattr(weighting, "combines_gradients", False) and cfg.device.precision == "fp16":
        raise UserError(f"loss={cfg.loss.method} combines per-task gradients, which fp16's loss scaling would distort; "
                        f"use device.precision=bf16 or fp32")
    optimizer = build_optimizer(cfg, model, weighting)
    scheduler = build_scheduler(cfg, optimizer, total_steps=cfg.trainer.epochs * len(loaders["train"]))
    wanted = {name: list(task.metrics) for name, task in cfg.tasks.items()}
    log.info("%d parameters (%d trainable); splits %s", sum(p.numel() for p in model.parameters()),
             sum(p.numel() for p in model.parameters() if p.requires_grad),
             {split: len(dataset) for split, dataset in data.datasets.items()})

    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")
    data_state = data.state()
    if data.tokenizer is not None:
        data.tokenizer.save_pretrained(run_dir / "tokenizer")
    text_encoder = model.encoders["text"] if "text" in model.encoders else None
    text_config = text_encoder.config_json() if text_encoder is not None else None
    paths = {"last": run_dir / "checkpoints" / "last.pt", "best": run_dir / "checkpoints" / "best.pt"}

    def save(tag: str, epoch: int, step: int, val_metrics: dict) -> None:
        save_checkpoint({
            "config": config_yaml, "model": model.state_dict(), "weighting": weighting.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
            "rng": {"torch": torch.get_rng_state(), "data_order": loaders["train"].generator.get_state()},
            "metrics": {"val": val_metrics}, "data": data_state, "text_config": text_config,
        }, paths[tag])

    metrics_log = MetricsLog(run_dir / "metrics.jsonl")
    try:
        best, last_val = fit(model, weighting, optimizer, scheduler, loaders, data.tasks, wanted, cfg, device,
                             metrics_log, save)
        test = {}
        for tag in ("last", "best"):  # the model holds the last weights first
            if tag == "best":
                model.load_state_dict(load_checkpoint(paths["best"])["model"])
            test[tag] = evaluate(model, loaders["test"], data.tasks, wanted, device, cfg.device.precision)[0]
            metrics_log.write(step=None, epoch=None, split="test", checkpoint=tag, **test[tag])
    finally:
        metrics_log.close()

    summary = {
        "monitor": cfg.trainer.monitor, "monitor_value": best["value"],
        "best": {"epoch": best["epoch"], "val": best["val"], "test": test["best"]},
        "final": {"epoch": cfg.trainer.epochs, "val": last_val, "test": test["last"]},
        "checkpoints": {tag: str(path) for tag, path in paths.items()},
        "samples": {split: len(dataset) for split, dataset in data.datasets.items()},
        "skipped_samples": data_state["skipped"],
        "labelled_samples": {split: {task: sum(v is not None for v in dataset.targets[task]) for task in dataset.targets}
                             for split, dataset in data.datasets.items()},
        "wall_time_s": round(time.time() - started, 2),
    }
    write_json(run_dir / "summary.json", summary)
    log.info("best epoch %d (%s=%.4f); test of best.pt: %s", best["epoch"], cfg.trainer.monitor, best["value"],
             ", ".join(f"{task} {name} {value:.4f}" for task, values in test["best"].items() if task != "mean"
                       for name, value in values.items() if name not in ("loss", "count")))
    log.info("run folder: %s", run_dir)
    return best["value"]


def check_monitor(cfg: DictConfig) -> None:
    """trainer.monitor must name a validation metric that will exist; say so before training, not after."""
    parts = str(cfg.trainer.monitor).split("/")
    choices = [f"val/{task}/{metric}" for task, spec in cfg.tasks.items() for metric in [*spec.metrics, "loss"]]
    shared = set.intersection(*[set(spec.metrics) | {"loss"} for spec in cfg.tasks.values()]) if cfg.tasks else set()
    choices += [f"val/mean/{metric}" for metric in sorted(shared)]
    if len(parts) != 3 or cfg.trainer.monitor not in choices:
        raise UserError(f"trainer.monitor={cfg.trainer.monitor!r} is not a validation metric of this run; "
                        f"choose one of {choices}")
    if cfg.trainer.monitor_mode not in ("max", "min"):
        raise UserError(f"trainer.monitor_mode={cfg.trainer.monitor_mode!r}; use max or min")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def attach_log_file(path: Path) -> logging.Handler | None:
    """Hydra already logs to <run folder>/train.log; a run started in-process (tests, notebooks) gets the same file."""
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
        return None
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


@hydra.main(version_base="1.3", config_path="pkg://mtmm.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)
    except UserError as error:
        exit_with(error)


if __name__ == "__main__":
    main()
