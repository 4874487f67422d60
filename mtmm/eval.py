"""`mtmm-eval checkpoint=PATH`: rebuild data and model from the checkpoint alone, score a split, write
metrics.json and per-sample predictions.jsonl to this evaluation's own run folder."""

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtmm.api import open_checkpoint, predicted_batch, restore_model
from mtmm.data.build import build_data, build_loader
from mtmm.calibration import fit_temperature
from mtmm.checkpoint import save_checkpoint
from mtmm.device import resolve_device
from mtmm.errors import UserError, exit_with
from mtmm.cache.images import attach_image_caches
from mtmm.loop import Outputs, evaluate
from mtmm.records import clean, write_json
from mtmm.robustness import LEVELS, evaluate_robustness, plot_curves
from mtmm.run_folder import claim, discard_if_only_hydra, start_command
from mtmm.trust import own_cache_dirs, use_own_cache_dirs

log = logging.getLogger("mtmm")
STARTED = time.time()  # imported before Hydra makes the evaluation folder


def evaluate_checkpoint(checkpoint: str | Path, split: str = "test", run_dir: Path | None = None,
                        device: str = "auto", precision: str | None = None, batch_size: int | None = None,
                        robustness: bool = False, levels=LEVELS, trusted_targets=(),
                        cache_dir: str | Path | None = None, calibrate: bool = False) -> dict:
    """Score `split` with the model in `checkpoint`; returns (and writes) the metrics. With `robustness`, also
    the metrics with each modality removed and under corruptions of growing strength (robustness.json/.png). With
    `calibrate`, one temperature per classification task is fitted on the validation split first, used for the
    metrics, and stored with the weights in calibrated.pt of the evaluation folder (which mtmm-predict and
    load_model take); the checkpoint itself is never written.

    The checkpoint may come from anyone: its config builds only mtmm's own components (and `trusted_targets`, the
    caller's choice), and the caches it would write to are under `cache_dir` (the caller's), see mtmm/trust.py."""
    if split not in ("train", "val", "test"):
        raise UserError(f"split={split!r}; use test, val or train")
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    state, cfg = open_checkpoint(checkpoint, trusted_targets)
    use_own_cache_dirs(cfg, own_cache_dirs(cache_dir))
    if batch_size is not None:
        cfg.data.eval_batch_size = batch_size
    precision = precision or cfg.device.precision
    torch_device = resolve_device(device)

    splits = (split,) + (("val",) if calibrate and split != "val" else ())
    data = build_data(cfg, splits=splits, saved=state["data"], origin=f"checkpoint {checkpoint}")
    model = restore_model(state, cfg, data.tasks, data.tokenizer, checkpoint).to(torch_device)
    # The training run's file when it can be read here; made now only for the many passes of robustness.
    attach_image_caches(cfg, data, [split], torch_device, make=robustness)
    temperatures = None
    if calibrate:
        temperatures = fit_temperatures(model, cfg, data, torch_device, precision)
        data.tasks = [replace(task, temperature=temperatures.get(task.name, 1.0)) for task in data.tasks]
    loader = build_loader(cfg, data, split, device=torch_device)
    metrics, outputs = evaluate(model, loader, data.tasks, torch_device, precision)

    claim(run_dir, "eval")
    write_json(run_dir / "metrics.json", {"checkpoint": str(Path(checkpoint).resolve()), "epoch": state["epoch"],
                                          "step": state["step"], "split": split, "metrics": metrics,
                                          **({"temperatures": temperatures} if temperatures is not None else {})})
    write_predictions(run_dir / "predictions.jsonl", outputs, data)
    if temperatures is not None:
        save_checkpoint({**state, "data": {**state["data"], "calibration": temperatures}}, run_dir / "calibrated.pt")
        print(f"temperatures {temperatures}: {run_dir / 'calibrated.pt'} (use it with mtmm-predict or load_model)")
    if robustness:
        result = evaluate_robustness(model, cfg, data, split, torch_device, precision, levels=tuple(levels))
        write_json(run_dir / "robustness.json", {"checkpoint": str(Path(checkpoint).resolve()), "split": split, **result})
        plot_curves(result, run_dir / "robustness.png")
        print(f"robustness: {run_dir / 'robustness.json'} and robustness.png")
    for task, values in metrics.items():
        print(f"{split} {task:>8}: " + "  ".join(f"{k} {v:.4f}" for k, v in values.items() if k != "count"))
    print(f"evaluation folder: {run_dir}")
    return metrics


def fit_temperatures(model, cfg, data, device, precision) -> dict[str, float]:
    """Per classification task, the temperature that minimises the validation split's NLL (calibration.py)."""
    outputs = evaluate(model, build_loader(cfg, data, "val", device=device), data.tasks, device, precision)[1]
    return {task.name: fit_temperature(task.type, outputs.logits[task.name][outputs.mask[task.name]],
                                       outputs.targets[task.name][outputs.mask[task.name]])
            for task in data.tasks if task.type != "regression"}


def write_predictions(path: Path, outputs: Outputs, data) -> None:
    """One line per sample: its id and, per task, the target and the prediction (class names, label names or a
    value in the target's units) with the model's probabilities."""
    dataset = next(iter(data.datasets.values()))
    # The split's logits as batches, as mtmm-predict does: element-wise kernels round a lone row and a row inside a
    # batch differently in the last bit, which the printed six digits can show.
    predictions = {task.name: predicted_batch(task, outputs.logits[task.name]) for task in data.tasks}
    with path.open("w", encoding="utf-8") as file:
        for row, index in enumerate(outputs.index.tolist()):
            record = {"id": dataset.ids[index]}
            for task in data.tasks:
                labelled = bool(outputs.mask[task.name][row])
                record[task.name] = {"target": target_of(task, outputs.targets[task.name][row], labelled),
                                     **predictions[task.name][row]}
            file.write(json.dumps(clean(record)) + "\n")


def target_of(task, target: torch.Tensor, labelled: bool):
    """The sample's target for the task in its own terms (class or label names, or a value in the target's units);
    None when it has no label."""
    if not labelled:
        return None
    if task.type == "regression":
        return float(target) * task.std + task.mean  # back to the target's units
    if task.type == "multilabel":
        return [name for name, on in zip(task.classes, target.tolist()) if on > 0.5]
    return task.classes[int(target)]


@hydra.main(version_base="1.3", config_path="pkg://mtmm.conf", config_name="eval")
def hydra_main(cfg: DictConfig) -> None:
    try:
        evaluate_checkpoint(cfg.checkpoint, split=cfg.split, device=cfg.device.type, precision=cfg.device.precision,
                            batch_size=cfg.batch_size, robustness=cfg.robustness, levels=cfg.robustness_levels,
                            trusted_targets=cfg.trusted_targets, cache_dir=cfg.cache_dir, calibrate=cfg.calibrate)
    except UserError as error:
        # A refused evaluation leaves nothing behind: the folder Hydra made for it held only Hydra's own files.
        discard_if_only_hydra(Path(HydraConfig.get().runtime.output_dir), since=STARTED)
        exit_with(error)


def main() -> None:
    start_command(hydra_main)


if __name__ == "__main__":
    main()
