"""`mtmm-train`: compose the config with Hydra, train, write the run folder. train(cfg) is a plain function."""

import json
import logging
import os
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mtmm import conflict, distributed
from mtmm.atomic import write_text_atomically
from mtmm.build import instantiate
from mtmm.checkpoint import CheckpointWriter, load_checkpoint, restore
from mtmm.device import resolve_device
from mtmm.ema import scored
from mtmm.errors import UserError, exit_with
from mtmm.loop import Progress, Stop, StopSignal, evaluate, fit
from mtmm.loggers import Resume, build_trackers, check_trackers, points
from mtmm.records import MetricsLog, count_lines, truncate_jsonl, write_json
from mtmm.resume import claim_before_hydra, resume_target, resumed_config
from mtmm.run import Run, setup
from mtmm.run_folder import claim, release

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
    """Set up, train, test the last and the best checkpoint, write summary.json; returns the best monitored value."""
    started = time.time()
    if rank.main:  # a missing tracker package stops the run before anything is built
        check_trackers(cfg.get("logger"))
    job = setup(cfg, resume, rank, run_dir)
    progress = Progress()
    if resume is not None:
        progress = restore(resume, job)
        log.info("resumed at epoch %d, batch %d, step %d", progress.epoch, progress.batch, progress.step)
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    if rank.main:  # again on resume: trainer.epochs may have changed
        write_text_atomically(run_dir / "config.yaml", config_yaml)
    if rank.main and resume is None and job.data.tokenizer is not None:
        job.data.tokenizer.save_pretrained(run_dir / "tokenizer")
    metrics_log = open_metrics_log(cfg, run_dir, resume, progress.step, rank)
    checkpoints = CheckpointWriter(job, config_yaml, metrics_log)

    stop = StopSignal()
    try:
        progress = fit(job, metrics_log, checkpoints.save, progress, stop.requested)
        test = {}
        for tag in ("last", "best"):  # the model (or its average) holds the last weights first
            tested = scored(job)
            if tag == "best":
                distributed.barrier(rank)  # rank 0 may still be writing best.pt
                tested.load_state_dict(load_checkpoint(job.paths["best"])["model"])
            test[tag] = evaluate(tested, job.loaders["test"], job.data.tasks, job.device, cfg.device.precision, rank,
                                 stop.requested)[0]
            metrics_log.write(step=None, epoch=None, split="test", checkpoint=tag, **test[tag])
        if rank.main:
            done = summary(job, progress, test, checkpoints.static["data"]["skipped"], time.time() - started)
            write_json(run_dir / "summary.json", done)
            metrics_log.finish(done)
    except Stop:
        raise UserError(f"stopped by {stop.name} at step {progress.step} (epoch {progress.epoch}); the checkpoint "
                        f"{job.paths['last']} is written. Resume with: mtmm-train resume={run_dir}") from None
    finally:
        metrics_log.close()
        stop.restore()

    best = progress.best
    log.info("best epoch %d (%s=%.4f); test of best.pt: %s", best["epoch"], cfg.trainer.monitor, best["value"],
             ", ".join(f"{task} {name} {value:.4f}" for task, values in test["best"].items() if task != "mean"
                       for name, value in values.items() if name not in ("loss", "count")))
    for line in conflict.describe(conflict.summarise(progress.conflicts)):
        log.info("gradient conflict: %s", line)
    log.info("run folder: %s", run_dir)
    return best["value"]


def summary(job: Run, progress: Progress, test: dict, skipped: dict, seconds: float) -> dict:
    """What summary.json holds: the best and the final metrics, the checkpoints, the data's counts, the wall time."""
    best, datasets = progress.best, job.data.datasets
    return {
        "monitor": job.cfg.trainer.monitor, "monitor_value": best["value"],
        "best": {"epoch": best["epoch"], "val": best["val"], "test": test["best"]},
        "best_per_task": {task: {**entry, **({"checkpoint": str(job.paths[f"best-{task}"])}
                                             if f"best-{task}" in job.paths else {})}
                          for task, entry in progress.best_per_task.items()},
        "final": {"epoch": job.cfg.trainer.epochs, "val": progress.last_val, "test": test["last"]},
        "checkpoints": {tag: str(path) for tag, path in job.paths.items()},
        "samples": {split: len(dataset) for split, dataset in datasets.items()},
        "skipped_samples": skipped,
        "labelled_samples": {split: {task: sum(v is not None for v in dataset.targets[task]) for task in dataset.targets}
                             for split, dataset in datasets.items()},
        "skipped_nonfinite_batches": progress.skipped_nonfinite,
        "gradient_conflict": conflict.summarise(progress.conflicts),
        "wall_time_s": round(seconds, 2),
    }


def open_metrics_log(cfg: DictConfig, run_dir: Path, resume: dict | None, step: int, rank) -> MetricsLog:
    """metrics.jsonl, cut back on resume to the records written before the checkpoint (they are written again), and
    the trackers of cfg.logger fed the same records; a resumed tracker skips the points it received before."""
    path = run_dir / "metrics.jsonl"
    if not rank.main:
        return MetricsLog(path, enabled=False)
    sent = points(path) if resume is not None and cfg.get("logger") else set()  # read before the cut
    if resume is not None:
        if "records" in resume:  # exactly the lines the file had when the checkpoint was written
            truncate_jsonl(path, lines=resume["records"])
        else:  # a checkpoint of an earlier mtmm: by step
            truncate_jsonl(path, lambda r: r.get("step") is not None and r["step"] <= step)
    resumed = Resume(step, count_lines(path), sent) if resume is not None else None
    trackers = build_trackers(cfg.get("logger"), run_dir, OmegaConf.to_container(cfg, resolve=True), resumed)
    return MetricsLog(path, trackers=trackers)


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
