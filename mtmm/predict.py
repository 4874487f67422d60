"""`mtmm-predict checkpoint=PATH input=FILE` (or image=/text= for one pair): a trained model's predictions on new
image + text pairs, into predictions.csv and predictions.jsonl of its own run folder (or a table on the console)."""

import csv
import json
import logging
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm import tqdm

from mtmm.api import Predictor, load_model, predicted_batch
from mtmm.data.dataset import ManifestDataset
from mtmm.data.readers import read_manifest
from mtmm.data.sources import rename_columns
from mtmm.data.workers import file_order_loader
from mtmm.errors import UserError, exit_with
from mtmm.records import clean
from mtmm.run_folder import claim, discard_if_only_hydra, start_command

log = logging.getLogger("mtmm")
STARTED = time.time()  # imported before Hydra makes the prediction folder


def predict_file(model: Predictor, path: str | Path, run_dir: Path, batch_size: int = 64,
                 columns: dict | None = None, image_root: str | Path | None = None, progress: bool = True) -> int:
    """Predict every row of a manifest-like file; writes run_dir/predictions.csv and .jsonl, returns the row count.
    Rows are read and checked as training manifests are (file, line, column and value in every error)."""
    path = Path(path).expanduser()
    records = rename_columns(read_manifest(path), dict(columns or {}), path)
    root = Path(image_root).expanduser() if image_root else path.parent
    # No task: labels are not read (a column of them may be there or not); images and texts are checked up front.
    dataset = ManifestDataset(records, path, root, [], model.transform, model.tokenizer, model.max_length)
    loader = file_order_loader(dataset, batch_size, 0)
    claim(run_dir, "predict")
    tasks = model.task_specs
    header = ["id"] + [column for task in tasks for column in csv_columns(task)]
    started, done = time.perf_counter(), 0
    with (run_dir / "predictions.csv").open("w", encoding="utf-8", newline="") as table, \
            (run_dir / "predictions.jsonl").open("w", encoding="utf-8") as lines:
        writer = csv.writer(table)
        writer.writerow(header)
        bar = tqdm(total=len(dataset), desc="predict", unit="pairs", disable=None if progress else True)
        for batch in loader:
            logits = model.logits(batch)
            per_task = {task.name: predicted_batch(task, logits[task.name]) for task in tasks}
            rows = [{"id": dataset.ids[index], **dict(zip(per_task, row))}
                    for index, row in zip(batch["index"].tolist(), zip(*per_task.values()))]
            lines.write("".join(json_line(row) + "\n" for row in rows))
            writer.writerows([row["id"], *(cell for task in tasks for cell in csv_cells(task, row[task.name]))]
                             for row in rows)
            done += len(batch["index"])
            bar.update(len(batch["index"]))
            bar.set_postfix(samples_per_s=f"{done / (time.perf_counter() - started):.0f}")
        bar.close()
    log.info("%d pairs predicted (%.0f samples/s): %s and predictions.jsonl", done,
             done / max(time.perf_counter() - started, 1e-9), run_dir / "predictions.csv")
    return done


JSON = json.JSONEncoder(allow_nan=False)  # json.dumps' output; made once (json.dumps(allow_nan=...) makes one a call)


def json_line(row: dict) -> str:
    """One row of predictions.jsonl; NaN/inf (not JSON) written as null, by records.clean, only where there is one."""
    try:
        return JSON.encode(row)
    except ValueError:
        return json.dumps(clean(row))


def csv_columns(task) -> list[str]:
    """The task's prediction, then one probability column per class (`<task>:<class>`; none for regression)."""
    return [task.name] + ([f"{task.name}:{name}" for name in task.classes] if task.type != "regression" else [])


def csv_cells(task, result: dict) -> list:
    prediction = result["prediction"]
    if task.type == "multilabel":
        prediction = "|".join(prediction)
    return [prediction, *result.get("probabilities", [])]


def print_table(model: Predictor, result: dict) -> None:
    """One pair's predictions, readable: per task the prediction and its classes by probability."""
    for task in model.task_specs:
        entry = result[task.name]
        if task.type == "regression":
            print(f"{task.name:>12}: {entry['prediction']:.4f}")
            continue
        ranked = sorted(zip(task.classes, entry["probabilities"]), key=lambda pair: -pair[1])
        shown = "|".join(entry["prediction"]) if task.type == "multilabel" else entry["prediction"]
        print(f"{task.name:>12}: {shown or '(none)'}   " + "  ".join(f"{name} {p:.3f}" for name, p in ranked[:5]))


@hydra.main(version_base="1.3", config_path="pkg://mtmm.conf", config_name="predict")
def hydra_main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        model = load_model(cfg.checkpoint, device=cfg.device.type, trusted_targets=cfg.trusted_targets)
        if cfg.input is not None:
            predict_file(model, cfg.input, run_dir, cfg.batch_size, cfg.columns, cfg.image_root)
            print(f"predictions: {run_dir / 'predictions.csv'} and predictions.jsonl")
        elif cfg.image is not None or cfg.text is not None:
            print_table(model, model.predict(images=[cfg.image] if model.transform is not None else None,
                                             texts=[cfg.text] if model.tokenizer is not None else None)[0])
            discard_if_only_hydra(run_dir, since=STARTED)  # a table on the console: nothing to keep
        else:
            raise UserError("give input=FILE (a CSV, TSV or JSONL of pairs) or image=FILE and/or text=TEXT")
    except UserError as error:
        discard_if_only_hydra(run_dir, since=STARTED)
        exit_with(error)


def main() -> None:
    start_command(hydra_main)


if __name__ == "__main__":
    main()
