"""`mtmm-train`: compose the config with Hydra, train, write the run folder. train(cfg) is a plain function."""

import json
import logging
import os
import random
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from mtmm import distributed
from mtmm.atomic import link_atomically, write_text_atomically
from mtmm.build import (build_data, build_loader, build_model, build_optimizer, build_scheduler, build_weighting,
                        instantiate)
from mtmm.checkpoint import load_checkpoint, save_checkpoint
from mtmm.device import resolve_device
from mtmm.errors import UserError, exit_with
from mtmm.feature_cache import feature_caches
from mtmm.image_cache import attach_image_caches
from mtmm.loop import Progress, Stop, evaluate, fit
from mtmm.records import MetricsLog, truncate_jsonl, write_json
from mtmm.run_folder import claim, holds_run, release
from mtmm.trust import CACHE_KEYS, check_saved_data, trusted_config, use_own_cache_dirs

log = logging.getLogger("mtmm")


def train(cfg: DictConfig, run_dir: Path | None = None, overrides: list[str] | None = None) -> float:
    """Train one model as `cfg` says, write everything into `run_dir` (Hydra's output dir by default) and return
    the monitored validation metric of the best epoch (what a sweeper optimises). With cfg.resume set, continue
    that run in its own folder from its last checkpoint instead, with its own config: of the command line's
    `overrides` (Hydra's by default) only those in RESUMABLE apply, others are refused."""
    resume_path, resuming = None, bool(cfg.get("resume"))
    if resuming:
        run_dir, resume_path = resume_target(cfg.resume)
        cfg = resumed_config(cfg, run_dir, resume_path, overrides)
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    main_process = os.environ.get("RANK", "0") == "0"  # torchrun starts every rank here; rank 0 holds the folder
    if main_process:
        claim(run_dir, "train", resuming=resuming)
    try:
        if resuming and resume_path is None:  # killed before its first checkpoint: start again, records too
            log.warning("%s has no checkpoint yet: starting its run again from config.yaml", run_dir)
            truncate_jsonl(run_dir / "metrics.jsonl", lines=0)
        return dispatch(cfg, run_dir, str(resume_path) if resume_path else None)
    finally:
        if main_process:
            release(run_dir)


def dispatch(cfg: DictConfig, run_dir: Path, resume_path: str | None) -> float:
    """Run in this process, in nproc_per_node processes, or as one rank of a torchrun launch."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun (e.g. on several nodes): this process is one rank
        return distributed_worker(OmegaConf.to_yaml(cfg), str(run_dir), resume_path)
    nproc = cfg.device.get("nproc_per_node", 1)
    if nproc > 1:
        instantiate(cfg.data.source)  # generate embedded data once, before the processes race for it
        distributed.launch(nproc, distributed_worker, OmegaConf.to_yaml(cfg), str(run_dir), resume_path)
        return json_value(run_dir / "summary.json", "monitor_value")
    file_log = attach_log_file(run_dir / "train.log")
    try:
        return run(cfg, run_dir, load_checkpoint(resume_path) if resume_path else None)
    finally:
        if file_log is not None:
            logging.getLogger().removeHandler(file_log)
            file_log.close()


def distributed_worker(cfg_yaml: str, run_dir: str, resume_path: str | None) -> float:
    """One process of a distributed run (started by torchelastic or torchrun)."""
    cfg = OmegaConf.create(cfg_yaml)
    rank = distributed.init(resolve_device(cfg.device.type).type)
    file_log = attach_log_file(Path(run_dir) / "train.log") if rank.main else None
    try:
        resume = load_checkpoint(resume_path) if resume_path else None
        return run(cfg, Path(run_dir), resume, rank)
    finally:
        if file_log is not None:
            logging.getLogger().removeHandler(file_log)
        torch.distributed.destroy_process_group()


def run(cfg: DictConfig, run_dir: Path, resume: dict | None, rank=distributed.Rank()) -> float:
    started = time.time()
    check_monitor(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device.type)
    if device.type == "cuda" and rank.world_size > 1:
        device = torch.device("cuda", rank.local_rank)
    log.info("run folder %s, device %s, precision %s%s", run_dir, device, cfg.device.precision,
             f", {rank.world_size} processes" if rank.world_size > 1 else "")

    data = build_data(cfg, saved=resume["data"] if resume else None)
    model = build_model(cfg, data.tasks, data.tokenizer, restoring=resume is not None,
                        saved_text_config=resume.get("text_config") if resume else None).to(device)
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
    scheduler = build_scheduler(cfg, optimizer, total_steps=cfg.trainer.epochs * len(loaders["train"]))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.device.precision == "fp16" and device.type == "cuda")
    forward = model
    if rank.world_size > 1:
        # find_unused_parameters: the 'missing' embeddings get no gradient in a batch where every sample is complete.
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.index is not None else None, find_unused_parameters=True)
    if cfg.trainer.get("compile"):
        forward = torch.compile(forward)
    wanted = {name: list(task.metrics) for name, task in cfg.tasks.items()}
    log.info("%d parameters (%d trainable); splits %s", sum(p.numel() for p in model.parameters()),
             sum(p.numel() for p in model.parameters() if p.requires_grad),
             {split: len(dataset) for split, dataset in data.datasets.items()})

    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    data_state = data.state()
    text_config = model.encoders["text"].config_json() if "text" in model.encoders else None
    paths = {"last": run_dir / "checkpoints" / "last.pt", "best": run_dir / "checkpoints" / "best.pt"}
    progress = Progress()
    if resume is not None:
        progress = restore(resume, model, weighting, optimizer, scheduler, scaler)
        log.info("resumed at epoch %d, batch %d, step %d", progress.epoch, progress.batch, progress.step)
    if rank.main:  # again on resume: trainer.epochs may have changed
        write_text_atomically(run_dir / "config.yaml", config_yaml)
    if rank.main and resume is None and data.tokenizer is not None:
        data.tokenizer.save_pretrained(run_dir / "tokenizer")

    if rank.main and resume is not None:  # records written after the checkpoint will be written again
        if "records" in resume:  # exactly the lines the file had when the checkpoint was written
            truncate_jsonl(run_dir / "metrics.jsonl", lines=resume["records"])
        else:  # a checkpoint of an earlier mtmm: by step
            truncate_jsonl(run_dir / "metrics.jsonl", lambda r: r.get("step") is not None and r["step"] <= progress.step)
    metrics_log = MetricsLog(run_dir / "metrics.jsonl", enabled=rank.main)
    written = {}  # tag -> the progress its checkpoint holds; only a step changes the weights, so the same
    # progress means the same contents (best.pt, then last.pt, at the end of an improving epoch)

    def save(tag: str, progress: Progress) -> None:
        if not rank.main:
            return
        now = asdict(progress)
        if tag == "last" and written.get("best") == now:
            link_atomically(paths["best"], paths["last"])  # no second serialisation of the same state
        else:
            save_checkpoint({
                "config": config_yaml, "model": model.state_dict(), "weighting": weighting.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": progress.epoch - 1, "step": progress.step, "progress": now, "rng": rng_state(),
                "metrics": {"val": progress.last_val}, "data": data_state, "text_config": text_config,
                "records": metrics_log.lines,
            }, paths[tag])
        written[tag] = now

    stop = StopSignal()
    try:
        progress = fit(model, weighting, optimizer, scheduler, scaler, loaders, data.tasks, wanted, cfg, device,
                       metrics_log, save, progress, stop.requested, rank, forward)
        test = {}
        for tag in ("last", "best"):  # the model holds the last weights first
            if tag == "best":
                distributed.barrier(rank)  # rank 0 may still be writing best.pt
                model.load_state_dict(load_checkpoint(paths["best"])["model"])
            test[tag] = evaluate(model, loaders["test"], data.tasks, wanted, device, cfg.device.precision, rank,
                                 stop.requested)[0]
            metrics_log.write(step=None, epoch=None, split="test", checkpoint=tag, **test[tag])
    except Stop:
        raise UserError(f"stopped by {stop.name} at step {progress.step} (epoch {progress.epoch}); the checkpoint "
                        f"{paths['last']} is written. Resume with: mtmm-train resume={run_dir}") from None
    finally:
        metrics_log.close()
        stop.restore()

    best = progress.best
    summary = {
        "monitor": cfg.trainer.monitor, "monitor_value": best["value"],
        "best": {"epoch": best["epoch"], "val": best["val"], "test": test["best"]},
        "final": {"epoch": cfg.trainer.epochs, "val": progress.last_val, "test": test["last"]},
        "checkpoints": {tag: str(path) for tag, path in paths.items()},
        "samples": {split: len(dataset) for split, dataset in data.datasets.items()},
        "skipped_samples": data_state["skipped"],
        "labelled_samples": {split: {task: sum(v is not None for v in dataset.targets[task]) for task in dataset.targets}
                             for split, dataset in data.datasets.items()},
        "skipped_nonfinite_batches": progress.skipped_nonfinite,
        "wall_time_s": round(time.time() - started, 2),
    }
    if rank.main:
        write_json(run_dir / "summary.json", summary)
    log.info("best epoch %d (%s=%.4f); test of best.pt: %s", best["epoch"], cfg.trainer.monitor, best["value"],
             ", ".join(f"{task} {name} {value:.4f}" for task, values in test["best"].items() if task != "mean"
                       for name, value in values.items() if name not in ("loss", "count")))
    log.info("run folder: %s", run_dir)
    return best["value"]


def restore(state: dict, model, weighting, optimizer, scheduler, scaler) -> Progress:
    """Put everything a checkpoint holds back in place, RNG states included, and say where to continue."""
    model.load_state_dict(state["model"])
    weighting.load_state_dict(state["weighting"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    random.setstate(rebuild_python_state(state["rng"]["python"]))
    torch.set_rng_state(state["rng"]["torch"])
    if torch.cuda.is_available() and state["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return Progress(**state["progress"])


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rebuild_python_state(saved: list) -> tuple:
    version, internal, gauss = saved
    return version, tuple(internal), gauss


def resume_target(target: str) -> tuple[Path, Path | None]:
    """resume= takes a run folder (then its checkpoints/last.pt) or a checkpoint inside one: (the run folder, the
    checkpoint to continue from, None when a kill came before the first checkpoint was written). A .pt anywhere
    else is not a run to continue, and mtmm writes only into its own run folders."""
    path = Path(target).expanduser()
    if path.is_dir():
        if not holds_run(path):
            raise UserError(f"resume={target}: {path} is not an mtmm run folder (no config.yaml written by "
                            f"mtmm-train); nothing to resume")
        last = path / "checkpoints" / "last.pt"
        return path, last if last.is_file() else None
    if not path.is_file():
        raise UserError(f"resume={target}: no such run folder or checkpoint")
    folder = path.parent.parent
    if path.parent.name != "checkpoints" or not holds_run(folder):
        raise UserError(f"resume={target}: not a checkpoint inside a run folder's checkpoints/ (resume= continues a "
                        f"run in its own folder: RUN or RUN/checkpoints/last.pt). To score this file: mtmm-eval "
                        f"checkpoint={target}")
    return folder, path


# What may change when a run is resumed: how it runs, not what it computes (besides training longer).
RESUMABLE = ("trainer.epochs", "trainer.progress", "trainer.log_every", "trainer.checkpoint_every", "device.type",
             "data.num_workers", "data.persistent_workers", "data.pin_memory")


def resumed_config(composed: DictConfig, run_dir: Path, checkpoint: Path | None,
                   overrides: list[str] | None) -> DictConfig:
    """The config a resumed run continues with: the run's own (from its checkpoint, else its config.yaml), checked
    as any config read from a file is (mtmm/trust.py), with the caches of this invocation and the RESUMABLE keys
    the command line sets; any other override stops with one line."""
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        text, source, done = state["config"], f"checkpoint {checkpoint}", state["progress"]["epoch"] - 1
    else:
        text, source, done = (run_dir / "config.yaml").read_text(encoding="utf-8"), str(run_dir / "config.yaml"), 0
    cfg = trusted_config(text, source, composed.get("trusted_targets") or ())
    if checkpoint is not None:
        check_saved_data(state, cfg, source)
    use_own_cache_dirs(cfg, {key: OmegaConf.select(composed, key) for key in CACHE_KEYS})
    if overrides is None:
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key in ("resume", "trusted_targets", *CACHE_KEYS):
            continue
        if key not in RESUMABLE or override.is_delete() or override.is_add():
            raise UserError(f"resume: {override.input_line} would change what the run computes, which a resumed "
                            f"run keeps; only {', '.join(RESUMABLE)} can change. Start a new run for other changes")
        value = OmegaConf.select(composed, key)
        if key == "trainer.epochs" and value < done:
            raise UserError(f"resume: trainer.epochs={value}, but the run has done {done} epochs already")
        if key == "trainer.epochs" and cfg.sched.name != "none" and value != cfg.trainer.epochs:
            log.warning("trainer.epochs %s -> %s: the learning-rate schedule is recomputed for the new length",
                        cfg.trainer.epochs, value)
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


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


def check_weighting(cfg: DictConfig, weighting, rank) -> None:
    gradient_based = getattr(weighting, "combines_gradients", False) or type(weighting).__name__ == "GradNorm"
    if getattr(weighting, "combines_gradients", False) and cfg.device.precision == "fp16":
        raise UserError(f"loss={cfg.loss.method} combines per-task gradients, which fp16's loss scaling would distort; "
                        f"use device.precision=bf16 or fp32")
    if gradient_based and rank.world_size > 1:
        raise UserError("gradient-based loss weighting (pcgrad, cagrad, mgda, imtl, aligned_mtl, nash_mtl, gradnorm) "
                        "takes per-task gradients, which DistributedDataParallel does not average; use one process")


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


def json_value(path: Path, key: str):
    return json.loads(path.read_text())[key]


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


def claim_before_hydra(argv: list[str]) -> list[str]:
    """Before Hydra writes its files (.hydra/, train.log) into a run folder, make sure mtmm may use it: a folder
    given with hydra.run.dir= or resume= is claimed now (run_folder.py). `mtmm-train resume=RUN` points Hydra at
    RUN itself (its train.log is appended to) and keeps the run's original .hydra/ by writing this invocation's
    Hydra files into .hydra/resumed-<time>/."""
    options = dict(argument.split("=", 1) for argument in argv[1:] if "=" in argument and not argument.startswith("-"))
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 holds the folder for all
    if options.get("resume") not in (None, "", "null"):
        folder, _ = resume_target(options["resume"])
        if main_process:
            claim(folder, "train", resuming=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return [*argv, f"hydra.run.dir={folder}", f"hydra.output_subdir=.hydra/resumed-{stamp}"]
    multirun = any(argument in ("-m", "--multirun") for argument in argv)
    if main_process and "hydra.run.dir" in options and not multirun and "${" not in options["hydra.run.dir"]:
        claim(Path(options["hydra.run.dir"]).expanduser(), "train")
    return argv


@hydra.main(version_base="1.3", config_path="pkg://mtmm.conf", config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    try:
        return train(cfg)
    except UserError as error:
        exit_with(error)


def main() -> None:
    try:
        sys.argv = claim_before_hydra(sys.argv)
    except UserError as error:
        exit_with(error)
    hydra_main()


if __name__ == "__main__":
    main()
