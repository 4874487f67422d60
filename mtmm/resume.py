"""Continuing a run: which folder and checkpoint `resume=` names, the config the run continues with (its own, checked
as any config read from a file is, with only the RESUMABLE overrides of the command line), and claiming the run
folder before Hydra writes into it."""

import logging
import os
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from mtmm.checkpoint import load_checkpoint
from mtmm.errors import UserError
from mtmm.run_folder import claim, holds_run
from mtmm.trust import CACHE_KEYS, check_saved_data, trusted_config, use_own_cache_dirs

log = logging.getLogger("mtmm")


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
             "data.num_workers", "data.persistent_workers", "data.pin_memory", "logger", "logger.mlflow.tracking_uri",
             "logger.wandb.mode")


def keep_trackers_local(cfg: DictConfig) -> None:
    """A stored config does not send this run's records off the machine (nor use the W&B login of whoever resumes):
    MLflow goes back to the run folder's own store and W&B to offline; the command line may set them again
    (logger=[mlflow,wandb] logger.mlflow.tracking_uri=... logger.wandb.mode=online)."""
    logger = cfg.get("logger") or {}
    if "mlflow" in logger and logger.mlflow.get("tracking_uri") is not None:
        log.warning("resume: logger.mlflow.tracking_uri=%s is not taken from the stored config; MLflow logs to the "
                    "run folder (give logger=mlflow logger.mlflow.tracking_uri=... again to continue there)",
                    logger.mlflow.tracking_uri)
        logger.mlflow.tracking_uri = None
    if "wandb" in logger and logger.wandb.get("mode") != "offline":
        log.warning("resume: logger.wandb.mode=%s is not taken from the stored config; W&B runs offline (give "
                    "logger=wandb logger.wandb.mode=online again to continue online)", logger.wandb.get("mode"))
        logger.wandb.mode = "offline"


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
    keep_trackers_local(cfg)
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
        OmegaConf.update(cfg, key, value, merge=False, force_add=key == "logger")  # trackers may be added
    return cfg


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
