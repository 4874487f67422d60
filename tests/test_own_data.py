"""Bring your own data: manifests in every format, every task type, partial labels, missing modalities,
the public datasets' native layouts and pretrained encoders, each trained for real on tiny files made here."""

import csv
import json
import random
import shutil

import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from mtmm.data.build import build_data
from mtmm.checkpoint import load_checkpoint
from mtmm.errors import UserError
from mtmm.eval import evaluate_checkpoint
from mtmm.train import train

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 40, 230)}
FAST = ["trainer.epochs=1", "trainer.progress=false", "device=cpu", "data.batch_size=8", "data.image_size=16",
        "encoder.text.hidden_size=32", "encoder.text.intermediate_size=64"]
LABEL_TASK = "+tasks.colour={type: multiclass, target: colour, weight: 1.0, head_hidden: [16], metrics: [accuracy, macro_f1]}"


def config(*overrides):
    """The training config on tiny inputs (a smaller bert_tiny unless another text encoder is chosen)."""
    fast = [o for o in FAST if not o.startswith("encoder.text.")] if "encoder/text=bert" in overrides else FAST
    with initialize_config_module("mtmm.conf", version_base="1.3"):
        return compose("train", overrides=[*fast, *overrides])


def make_rows(folder, count=30, seed=0):
    """Images of one colour (of varying sizes) with captions naming it; rows as dicts with every task type."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        colour = rng.choice(sorted(COLOURS))
        Image.new("RGB", (rng.randint(18, 30), rng.randint(18, 30)), COLOURS[colour]).save(folder / "images" / f"{i}.png")
        rows.append({"id": f"s{i}", "img_path": f"images/{i}.png", "caption": f"a {colour} picture",
                     "colour": colour, "bright": int(colour != "blue"), "tags": "warm|vivid" if colour == "red" else "cool",
                     "score": round(rng.uniform(0, 10), 3), "split": ["train", "train", "val", "test"][i % 4]})
    return rows


def write_csv(path, rows, delimiter=","):
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def manifest_overrides(train_file, *extra):
    return ["data=manifest", f"data.source.train={train_file}", "data.source.columns.image=img_path",
            "data.source.columns.text=caption", "tasks=none", LABEL_TASK, *extra]


def test_csv_with_class_names_trains_and_eval_uses_the_saved_class_map(tmp_path):
    rows = make_rows(tmp_path)
    files = {split: write_csv(tmp_path / f"{split}.csv", [r for r in rows if r["split"] == split])
             for split in ("train", "val", "test")}
    cfg = config(*manifest_overrides(files["train"], f"data.source.val={files['val']}", f"data.source.test={files['test']}",
                                     "trainer.monitor=val/colour/accuracy"))
    train(cfg, run_dir=tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert state["data"]["classes"]["colour"] == ["blue", "green", "red"]  # learnt from the training split, sorted
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["samples"] == {"train": 16, "val": 7, "test": 7}
    metrics = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", run_dir=tmp_path / "eval", device="cpu")
    assert json.loads(json.dumps(metrics)) == summary["best"]["test"]
    first = json.loads((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()[0])
    assert first["id"] == "s3" and first["colour"]["target"] in COLOURS


def test_tsv_with_split_column_and_jsonl_with_random_split(tmp_path):
    rows = make_rows(tmp_path)
    tsv = write_csv(tmp_path / "all.tsv", rows, delimiter="\t")
    data = build_data(config(*manifest_overrides(tsv, "data.source.split_column=split")))
    assert {split: len(d) for split, d in data.datasets.items()} == {"train": 16, "val": 7, "test": 7}

    jsonl = tmp_path / "all.jsonl"
    jsonl.write_text("".join(json.dumps({**row, "tags": row["tags"].split("|")}) + "\n" for row in rows))
    split_a = build_data(config(*manifest_overrides(jsonl, "data.source.val_fraction=0.2", "data.source.test_fraction=0.1")))
    split_b = build_data(config(*manifest_overrides(jsonl, "data.source.val_fraction=0.2", "data.source.test_fraction=0.1")))
    assert {split: len(d) for split, d in split_a.datasets.items()} == {"train": 21, "val": 6, "test": 3}
    assert split_a.datasets["val"].ids == split_b.datasets["val"].ids  # seeded: the same split every time
    other = build_data(config(*manifest_overrides(jsonl, "data.source.val_fraction=0.2", "data.source.split_seed=1")))
    assert other.datasets["val"].ids != split_a.datasets["val"].ids
    assert not set(split_a.datasets["val"].ids) & set(split_a.datasets["train"].ids)


def test_every_task_type_with_partial_labels_and_missing_modalities(tmp_path):
    rows = make_rows(tmp_path, count=40)
    rows[0]["colour"] = ""  # no label for this task on this row
    rows[1]["score"] = ""
    rows[4]["caption"] = ""  # no text
    rows[5]["img_path"] = ""  # no image
    path = write_csv(tmp_path / "all.csv", rows)
    tasks = [LABEL_TASK,
             "+tasks.bright={type: binary, target: bright, classes: [dark, bright], weight: 1.0, head_hidden: [], metrics: [accuracy, f1, auroc]}",
             "+tasks.tags={type: multilabel, target: tags, weight: 1.0, head_hidden: [], metrics: [micro_f1, macro_f1, map]}",
             "+tasks.score={type: regression, target: score, standardize: true, weight: 0.5, head_hidden: [], metrics: [mae, rmse, r2]}"]
    cfg = config(*manifest_overrides(path, "data.source.split_column=split", *tasks[1:]), tasks[0] if False else "seed=0",
                 "trainer.monitor=val/mean/loss", "trainer.monitor_mode=min")
    train(cfg, run_dir=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    test = summary["best"]["test"]
    assert set(test["tags"]) >= {"micro_f1", "macro_f1", "map"} and set(test["score"]) >= {"mae", "rmse", "r2"}
    assert summary["labelled_samples"]["train"]["colour"] == 19 and summary["labelled_samples"]["train"]["score"] == 19
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert state["data"]["classes"]["tags"] == ["cool", "vivid", "warm"]
    mean, std = state["data"]["stats"]["score"]
    train_scores = [r["score"] for r in rows if r["split"] == "train" and r["score"] != ""]
    assert mean == pytest.approx(sum(train_scores) / len(train_scores))
    assert 0 < test["score"]["mae"] < 10  # reported in the target's own units, not standardised ones
    metrics = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", run_dir=tmp_path / "eval", device="cpu")
    assert json.loads(json.dumps(metrics)) == test


def test_missing_modality_uses_the_learnt_embedding(tmp_path):
    rows = make_rows(tmp_path, count=8)
    rows[0]["img_path"] = ""
    cfg = config(*manifest_overrides(write_csv(tmp_path / "m.csv", rows), "data.source.split_column=split"))
    data = build_data(cfg)
    from mtmm.build import build_model
    model = build_model(cfg, data.tasks, data.tokenizer).eval()
    train_set = data.datasets["train"]
    batch = train_set.batch(list(range(len(train_set))))
    assert batch["present"]["image"].tolist() == [False, True, True, True]
    features = model.encode(batch)["image"]
    assert torch.equal(features.pooled[0], model.missing["image"].detach())
    with torch.no_grad():
        model.missing["image"].add_(1.0)
    assert torch.equal(model.encode(batch)["image"].pooled[0], model.missing["image"].detach())


@pytest.mark.parametrize("problem, fragment", [
    (("colour", "purple"), "'purple'"), (("bright", "7"), "label 7 of task 'bright' is out of range"),
    (("score", "nan"), "not finite"), (("img_path", "images/missing.png"), "does not exist"),
    (("img_path", "corrupt.png"), "cannot read image"),
])
def test_bad_input_names_file_row_column_and_value(tmp_path, problem, fragment):
    rows = make_rows(tmp_path, count=8)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    column, value = problem
    rows[2][column] = value
    path = write_csv(tmp_path / "m.csv", rows)
    tasks = ["+tasks.bright={type: binary, target: bright, classes: [dark, bright], weight: 1.0, head_hidden: [], metrics: [accuracy]}",
             "+tasks.score={type: regression, target: score, weight: 1.0, head_hidden: [], metrics: [mae]}"]
    cfg = config(*manifest_overrides(path, "data.source.split_column=split", *tasks), "trainer.monitor=val/mean/loss",
                 "trainer.monitor_mode=min")
    with pytest.raises(UserError) as error:
        train(cfg, run_dir=tmp_path / "run")
    message = str(error.value)
    assert str(path) in message and "line 4" in message and fragment in message  # row 2 of the data = line 4
    assert not (tmp_path / "run" / "checkpoints").exists()

    skipping = config(*manifest_overrides(path, "data.source.split_column=split", *tasks), "data.on_bad_sample=skip",
                      "trainer.monitor=val/mean/loss", "trainer.monitor_mode=min")
    train(skipping, run_dir=tmp_path / "skip")
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["skipped_samples"] == {"train": 0, "val": 1, "test": 0} and summary["samples"]["val"] == 1


def test_missing_column_and_malformed_lines(tmp_path):
    rows = make_rows(tmp_path, count=8)
    path = write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(UserError, match="columns.image='picture' but the file has no such column"):
        build_data(config(*manifest_overrides(path, "data.source.columns.image=picture")))
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(UserError, match=r"m.jsonl, line 2: not valid JSON"):
        build_data(config(*manifest_overrides(jsonl)))


def make_image(path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), colour).save(path)


def test_hateful_memes_layout(tmp_path):
    for split, name in (("train", "train"), ("val", "dev_seen"), ("test", "test_seen")):
        lines = []
        for i in range(8):
            make_image(tmp_path / "img" / f"{split}{i}.png", (40 * i, 20, 20))
            lines.append(json.dumps({"id": f"{split}{i}", "img": f"img/{split}{i}.png", "label": i % 2, "text": f"meme {i}"}))
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    train(config("data=hateful_memes", f"data.source.root={tmp_path}", "tasks=hateful_memes",
                 "trainer.monitor=val/hateful/auroc"), run_dir=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["samples"] == {"train": 8, "val": 8, "test": 8} and "auroc" in summary["best"]["test"]["hateful"]


def test_crisismmd_layout_joins_the_three_tasks(tmp_path):
    header = ["event_name", "tweet_id", "image_id", "tweet_text", "image", "label", "label_text", "label_image"]
    labels = {"informative": ["informative", "not_informative"],
              "humanitarian": ["rescue_volunteering_or_donation_effort", "other_relevant_information", "not_humanitarian"],
              "damage": ["severe_damage", "little_or_no_damage"]}
    for suffix in ("train", "dev", "test"):
        for task, names in labels.items():
            rows = []
            for i in range(9 if task != "damage" else 5):  # damage labels only some samples
                image = f"data_image/fire/{suffix}_{i}.jpg"
                make_image(tmp_path / image)
                rows.append(["fire", str(100 + i), f"{100 + i}_0", f"tweet {i} about the fire", image, names[i % len(names)],
                             names[0], names[0]])
            folder = tmp_path / "crisismmd_datasplit_all"
            folder.mkdir(exist_ok=True)
            with (folder / f"task_{task}_text_img_{suffix}.tsv").open("w", newline="") as file:
                writer = csv.writer(file, delimiter="\t")
                writer.writerow(header)
                writer.writerows(rows)
    cfg = config("data=crisismmd", f"data.source.root={tmp_path}", "tasks=crisismmd", "trainer.monitor=val/mean/loss",
                 "trainer.monitor_mode=min")
    train(cfg, run_dir=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["samples"]["train"] == 9
    assert summary["labelled_samples"]["train"] == {"informative": 9, "humanitarian": 9, "damage": 5}
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert state["data"]["classes"]["humanitarian"] == sorted(labels["humanitarian"])


def test_mmimdb_layout(tmp_path):
    genres = [["Drama"], ["Comedy", "Drama"], ["Horror"], ["Comedy"]]
    ids = {"train": [f"00{i}" for i in range(8)], "dev": ["100", "101"], "test": ["200", "201", "202"]}
    for movie_ids in ids.values():
        for n, movie in enumerate(movie_ids):
            make_image(tmp_path / "dataset" / f"{movie}.jpeg", (30 * n, 10, 10))
            (tmp_path / "dataset" / f"{movie}.json").write_text(json.dumps({"plot": [f"plot of {movie}", "other"],
                                                                            "genres": genres[n % 4]}))
    (tmp_path / "split.json").write_text(json.dumps(ids))
    train(config("data=mmimdb", f"data.source.root={tmp_path}", "tasks=mmimdb", "trainer.monitor=val/genres/micro_f1"),
          run_dir=tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert state["data"]["classes"]["genres"] == ["Comedy", "Drama", "Horror"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["samples"]["test"] == 3


def test_public_dataset_root_missing_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="download Hateful Memes yourself"):
        build_data(config("data=hateful_memes", f"data.source.root={tmp_path / 'nope'}", "tasks=hateful_memes"))


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_pretrained_text_encoder_from_a_local_directory(tmp_path, family):
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel
    from mtmm.data.tokenizer import train_wordpiece
    rows = make_rows(tmp_path, count=16)
    tokenizer = train_wordpiece([r["caption"] for r in rows], vocab_size=60)
    size = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(3)
    model = BertModel(BertConfig(**size)) if family == "bert" else RobertaModel(RobertaConfig(**size, max_position_embeddings=80))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    path = write_csv(tmp_path / "m.csv", rows)
    cfg = config(*manifest_overrides(path, "data.source.split_column=split"), "encoder/text=bert",
                 f"encoder.text.name={tmp_path / 'model'}")
    train(cfg, run_dir=tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    saved = model.state_dict()
    key = "embeddings.word_embeddings.weight"
    assert state["model"][f"encoders.text.model.{key}"].shape == saved[key].shape
    # The optimizer moved the weights a little, from the saved ones (not from a random init).
    assert (state["model"][f"encoders.text.model.{key}"] - saved[key]).abs().max() < 0.05
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    shutil.rmtree(tmp_path / "model")  # evaluation needs nothing but the checkpoint
    metrics = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", run_dir=tmp_path / "eval", device="cpu")
    assert json.loads(json.dumps(metrics)) == summary["best"]["test"]


def test_frozen_encoders_and_their_own_learning_rate(tmp_path):
    rows = make_rows(tmp_path, count=16)
    path = write_csv(tmp_path / "m.csv", rows)
    cfg = config(*manifest_overrides(path, "data.source.split_column=split"), "encoder.image.freeze=true",
                 "optim.encoder_lr=0.0")
    torch.manual_seed(cfg.seed)
    train(cfg, run_dir=tmp_path / "run")
    from mtmm.build import build_model
    data = build_data(cfg, splits=("train",))
    torch.manual_seed(cfg.seed)
    initial = build_model(cfg, data.tasks, data.tokenizer).state_dict()
    trained = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    for key in ("encoders.image.body.0.weight", "encoders.image.body.1.running_mean", "encoders.text.model.embeddings.word_embeddings.weight"):
        assert torch.equal(trained[key], initial[key]), key  # frozen (and BatchNorm statistics kept) / lr 0
    assert not torch.equal(trained["heads.colour.3.weight"], initial["heads.colour.3.weight"])


def test_torchvision_weight_name_brings_its_normalisation_and_size(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = config("encoder/image=resnet18", "encoder.image.weights=IMAGENET1K_V1")
    from mtmm.data.build import image_transform
    assert (image_transform(cfg).size, image_transform(cfg).crop) == (256, 224)
    from mtmm.build import instantiate
    with pytest.raises(UserError, match="resnet18-f37072fd.pth is missing and mtmm never downloads"):
        instantiate(cfg.encoder.image)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(5)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, checkpoints / "resnet18-f37072fd.pth")
    encoder = instantiate(cfg.encoder.image)
    assert torch.equal(encoder.body[0].weight, state["conv1.weight"])
    assert torch.allclose(encoder.normalize.mean.flatten() / 255, torch.tensor([0.485, 0.456, 0.406]))
