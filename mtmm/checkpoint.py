"""The checkpoint format: a plain dict of tensors, numbers and strings, loadable with weights_only=True.

Keys: format, version, config (resolved YAML text), model, weighting, optimizer, scheduler, scaler, epoch, step,
progress, rng, metrics, data (tokenizer files, label names), text_config / image_config (architecture of a Hugging Face encoder),
records (lines of metrics.jsonl when it was written). Written atomically; `restore` puts it all back in place.
"""

import random
from dataclasses import asdict
from pathlib import Path

import torch

from mtmm.atomic import link_atomically, write_atomically  # noqa: F401 - the checkpoint's atomic writes, re-exported
from mtmm.ema import scored
from mtmm.errors import UserError
from mtmm.loop import Progress

FORMAT = "mtmm-checkpoint"
VERSION = 1


def save_checkpoint(state: dict, path: Path) -> None:
    save_atomically({"format": FORMAT, "version": VERSION, **state}, path)


def save_atomically(obj, path: Path) -> None:
    """torch.save `obj` to `path` through write_atomically."""
    write_atomically(path, lambda file: torch.save(obj, file))


class CheckpointWriter:
    """Writes a run's checkpoints/last.pt and best.pt (on rank 0; a no-op on the others). The parts that do not change
    during training (config, data side, text architecture) are computed once; `records` is the run's MetricsLog,
    whose line count each checkpoint stores so that resuming keeps exactly the records written before it."""

    def __init__(self, run, config_yaml: str, records):
        self.run, self.records = run, records
        self.static = {"config": config_yaml, "data": run.data.state(),
                       **{f"{modality}_config": architecture(run.model.encoders[modality])
                          if modality in run.model.encoders else None for modality in ("text", "image")}}
        self.written = {}  # tag -> the progress its file holds

    def save(self, tag: str, progress: Progress) -> None:
        if not self.run.rank.main:
            return
        now = asdict(progress)
        # Only a step changes the weights, so the same progress means the same contents (best.pt, best-<task>.pt,
        # then last.pt, at the end of an improving epoch): one file under several names, not a second serialisation.
        twin = next((other for other, held in self.written.items() if held == now and other != tag), None)
        if twin is not None:
            link_atomically(self.run.paths[twin], self.run.paths[tag])
        else:
            save_checkpoint({**self.static, **training_state(self.run, progress), "records": self.records.lines},
                            self.run.paths[tag])
        self.written[tag] = now


def training_state(run, progress: Progress) -> dict:
    """Everything that changes while a run trains, as checkpoint entries. `model` holds the weights meant for use
    (with trainer.ema, their moving average, which validation scored); the trained ones are then `trained_model`."""
    averaged = {} if run.ema is None else {"trained_model": run.model.state_dict(),
                                           "ema_updates": int(run.ema.n_averaged)}
    return {"model": scored(run).state_dict(), **averaged, "weighting": run.weighting.state_dict(),
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(), "epoch": progress.epoch - 1, "step": progress.step,
            "progress": asdict(progress), "rng": rng_state(), "metrics": {"val": progress.last_val}}


def restore(state: dict, run) -> Progress:
    """Put everything a checkpoint holds back in place, RNG states included, and say where to continue."""
    if run.ema is not None:
        if "trained_model" not in state:
            raise UserError("the checkpoint was written without trainer.ema, so it holds no average to continue")
        run.ema.module.load_state_dict(state["model"])
        run.ema.n_averaged.fill_(state["ema_updates"])
    run.model.load_state_dict(state.get("trained_model", state["model"]))
    run.weighting.load_state_dict(state["weighting"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return Progress(**state["progress"])


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(saved: dict) -> None:
    version, internal, gauss = saved["python"]  # a checkpoint holds lists, random.setstate wants tuples
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(saved["torch"])
    if torch.cuda.is_available() and saved.get("cuda"):
        torch.cuda.set_rng_state_all(saved["cuda"])


def architecture(encoder) -> str | None:
    """A Hugging Face encoder's model config as JSON (what rebuilds it without its files); None for the others,
    whose architecture the run's config describes in full."""
    return encoder.config_json() if hasattr(encoder, "config_json") else None


def load_checkpoint(path: str | Path) -> dict:
    """Load and check a checkpoint, or a folder written by `mtmm-export format=safetensors` (read into the same
    dict: config, data, model, text_config, image_config, epoch, step, metrics); anything else (missing, truncated, foreign) is
    a one-line UserError."""
    path = Path(path).expanduser()
    if path.is_dir():
        from mtmm.export import load_export  # noqa: PLC0415 - export.py reads checkpoints with this function

        return load_export(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist (expected a .pt file written by mtmm-train, "
                        f"e.g. <run folder>/checkpoints/best.pt, or a folder written by mtmm-export)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated zip, pickle of foreign objects, not a torch file at all
        raise UserError(f"checkpoint {path} cannot be read: {why_unreadable(path, error)}; "
                        f"pass a checkpoints/best.pt or last.pt written by mtmm-train") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not an mtmm checkpoint (no format={FORMAT!r} entry); "
                        f"pass a checkpoints/best.pt or last.pt written by mtmm-train")
    if state.get("version") != VERSION:
        raise UserError(f"checkpoint {path} has format version {state.get('version')}; "
                        f"this mtmm reads version {VERSION}")
    return state


def why_unreadable(path: Path, error: Exception) -> str:
    """torch.load's errors are long and technical; say in a few words what is wrong with the file."""
    with path.open("rb") as file:
        head = file.read(4)
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        return "it is not a torch file" if head else "the file is empty"
    if "Weights only load failed" in str(error):
        return "it holds pickled Python objects, which mtmm never loads (its checkpoints hold only tensors, numbers and strings)"
    return "the file is truncated or corrupt (not a complete torch archive)"
