"""Use a trained model: mtmm-predict on a file or one pair, and the Python API (load_model) on paths, PIL images and
tensors, with a modality missing; the same numbers as mtmm-eval for the same rows."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from conftest import train_tiny
from mtmm import load_model
from mtmm.api import predicted_batch
from mtmm.errors import UserError
from mtmm.eval import evaluate_checkpoint
from mtmm.predict import predict_file
from mtmm.tasks import TaskSpec

BIN = Path(sys.executable).parent
SMALL = ["encoder.text.hidden_size=16", "encoder.text.intermediate_size=32", "trainer.epochs=1",
         "tasks=img+txt+match", "data.image_size=32"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    checkpoint = train_tiny(folder, *SMALL)
    (dataset,) = (folder / "data").glob("shapes-*")
    return checkpoint, dataset


def test_predict_on_a_file_equals_mtmm_eval_on_the_same_rows(trained, tmp_path):
    checkpoint, dataset = trained
    model = load_model(checkpoint, device="cpu")
    count = predict_file(model, dataset / "test.jsonl", tmp_path / "predict", progress=False)
    evaluate_checkpoint(checkpoint, run_dir=tmp_path / "eval", device="cpu", cache_dir=tmp_path.parent)
    predicted = [json.loads(line) for line in (tmp_path / "predict" / "predictions.jsonl").read_text().splitlines()]
    scored = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert count == len(predicted) == len(scored) == 32
    for ours, theirs in zip(predicted, scored):
        assert ours["id"] == theirs["id"]
        for task in ("img", "txt", "match"):
            assert ours[task] == {key: value for key, value in theirs[task].items() if key != "target"}
    with (tmp_path / "predict" / "predictions.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert rows[0]["id"] == predicted[0]["id"] and rows[0]["img"] == predicted[0]["img"]["prediction"]
    assert float(rows[0]["match:same"]) == pytest.approx(predicted[0]["match"]["probabilities"][1])


def test_a_split_at_once_and_in_the_predictors_batches_print_the_same_digits():
    """mtmm-eval describes a split's logits in one batch, mtmm-predict in batches of 64: every row must print the same
    six digits both ways, for every task type (row by row, with 1 - p taken in double, ~1 binary logit in 30 and, for
    sigmoids, element-wise kernels' lone-row path, split them apart)."""
    logits = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0)) * 4
    for task in (TaskSpec(name="match", type="binary", target="match", classes=("different", "same")),
                 TaskSpec(name="txt", type="multiclass", target="sentiment", classes=("neg", "neu", "pos")),
                 TaskSpec(name="tags", type="multilabel", target="tags", classes=("a", "b", "c"), temperature=1.7),
                 TaskSpec(name="size", type="regression", target="size", mean=9.5, std=2.5)):
        rows = logits[:, :1] if task.type in ("binary", "regression") else logits
        whole = predicted_batch(task, rows)
        assert whole == [row for start in range(0, len(rows), 64) for row in predicted_batch(task, rows[start:start + 64])]
        assert len({str(row) for row in whole}) > 900  # the rows do differ (a few saturate alike)


def test_the_api_takes_paths_pil_images_and_tensors_and_missing_modalities(trained, tmp_path):
    checkpoint, dataset = trained
    model = load_model(checkpoint, device="cpu")
    assert [t["name"] for t in model.tasks] == ["img", "txt", "match"]
    assert model.tasks[0]["classes"][:2] == ["circle", "square"] and model.tasks[2]["type"] == "binary"
    rows = [json.loads(line) for line in (dataset / "test.jsonl").read_text().splitlines()[:3]]
    paths = [dataset / row["image"] for row in rows]
    texts = [row["text"] for row in rows]
    by_path = model.predict(images=paths, texts=texts)
    pil = [Image.open(path) for path in paths]
    tensors = [pil_to_tensor(image.convert("RGB")) for image in pil]
    assert tensors[0].dtype == torch.uint8 and tensors[0].shape[0] == 3
    assert model.predict(images=pil, texts=texts) == by_path == model.predict(images=tensors, texts=texts)
    # A missing image is what an empty image cell of a file is.
    manifest = tmp_path / "pairs.csv"
    with manifest.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "image", "text"])
        writer.writerow(["a", "", texts[0]])
        writer.writerow(["b", str(paths[1]), ""])
    predict_file(model, manifest, tmp_path / "out", progress=False)
    from_file = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    from_api = model.predict(images=[None, paths[1]], texts=[texts[0], None])
    assert [{k: v for k, v in row.items() if k != "id"} for row in from_file] == from_api
    assert model.embed(images=paths, texts=texts).shape[0] == 3


def test_bad_input_names_the_file_line_and_column(trained, tmp_path):
    checkpoint, _ = trained
    model = load_model(checkpoint, device="cpu")
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("image,text\nmissing.png,a red circle\n")
    with pytest.raises(UserError, match=r"pairs.csv, line 2, column 'image': image file .*missing.png does not exist"):
        predict_file(model, manifest, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="give a path, a PIL image or a uint8 tensor"):
        model.predict(images=[3.5], texts=["x"])


@pytest.mark.slow
def test_mtmm_predict_one_pair_prints_a_table_and_keeps_no_folder(trained, tmp_path):
    checkpoint, dataset = trained
    row = json.loads((dataset / "test.jsonl").read_text().splitlines()[0])
    result = subprocess.run([str(BIN / "mtmm-predict"), f"checkpoint={checkpoint}", f"image={dataset / row['image']}",
                             f"text={row['text']}", "device=cpu", f"hydra.run.dir={tmp_path / 'one'}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line.split(":")[0].strip() for line in result.stdout.splitlines() if ":" in line]
    assert lines == ["img", "txt", "match"] and not (tmp_path / "one").exists()
