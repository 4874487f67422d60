"""Manifests, labels, images, batches and build_data: bad input is a UserError naming file, line, field, value."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from mtmm.data.build import build_data
from mtmm.data.collate import pad_token_ids
from mtmm.data.dataset import ManifestDataset
from mtmm.tasks import TaskSpec, parse_target
from mtmm.data.images import ImageTransform
from mtmm.data.readers import read_manifest as read_jsonl
from mtmm.errors import UserError

SHAPE = TaskSpec(name="img", type="multiclass", target="shape", classes=("circle", "square", "star"))
SHAPE_NAMES = ["circle", "square", "triangle", "star", "cross", "diamond"]  # conf/task/img.yaml
MATCH = TaskSpec(name="match", type="binary", target="match", classes=("different", "same"))


def write_manifest(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def write_png(path: Path, size=(8, 6), mode="RGB", color=(10, 20, 30)) -> None:
    Image.new(mode, size, color=120 if mode == "L" else color).save(path)


def dataset(tmp_path: Path, records: list, tasks=(SHAPE,), transform=None, tokenizer=None) -> ManifestDataset:
    manifest = write_manifest(tmp_path / "train.jsonl", records)
    return ManifestDataset(read_jsonl(manifest), manifest, tmp_path, list(tasks), transform, tokenizer)


@pytest.mark.parametrize("lines, line_no, fragment", [
    (['{"shape": "star"}', '{"shape": '], 2, "not valid JSON"),
    (['{"shape": "star"}', "", '[1, 2]'], 3, "expected a JSON object"),
    (['"just a string"'], 1, "expected a JSON object"),
])
def test_read_jsonl_bad_line(tmp_path, lines, line_no, fragment):
    path = write_manifest(tmp_path / "m.jsonl", lines)
    with pytest.raises(UserError, match=fragment) as error:
        read_jsonl(path)
    assert str(path) in str(error.value) and f"line {line_no}:" in str(error.value)


@pytest.mark.parametrize("content, fragment", [(None, "does not exist"), ("", "no samples"), ("\n  \n", "no samples")])
def test_read_jsonl_missing_or_empty(tmp_path, content, fragment):
    path = tmp_path / "m.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=fragment) as error:
        read_jsonl(path)
    assert str(path) in str(error.value)


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = write_manifest(tmp_path / "m.jsonl", ['{"a": 1}', "", "   ", '{"a": 2}'])
    records = read_jsonl(path)
    assert [record["a"] for record in records] == [1, 2]
    assert [record["_line"] for record in records] == [1, 4]  # each record remembers its line for error messages


def test_read_jsonl_invalid_utf8_is_user_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"shape": "star"}\n{"shape": "\xff\xfe"}\n')
    with pytest.raises(UserError) as error:
        read_jsonl(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("value, expected", [
    ("circle", 0), ("star", 2), (1, 1), (0, 0), (True, 1), (False, 0), (None, None), ("", None),
])
def test_class_labels_accepted(value, expected):
    assert parse_target(SHAPE, value, "here") == expected


@pytest.mark.parametrize("value, fragment", [
    ("blob", "'blob'"), ("Circle", "'Circle'"), (3, "label 3"), (-1, "label -1"), (1.0, "1.0"), (["star"], "star"),
])
def test_bad_label_names_file_line_field_and_value(tmp_path, value, fragment):
    with pytest.raises(UserError) as error:
        dataset(tmp_path, [{"shape": "circle"}, {"shape": value}])
    message = str(error.value)
    assert str(tmp_path / "train.jsonl") in message and "line 2" in message
    assert "'shape'" in message and fragment in message and "'img'" in message


def test_missing_target_column_names_file_and_column(tmp_path):
    with pytest.raises(UserError) as error:
        dataset(tmp_path, [{"colour": "blue"}, {"colour": "red"}])
    message = str(error.value)
    assert str(tmp_path / "train.jsonl") in message and "no column 'shape'" in message and "'colour'" in message


def test_a_row_without_the_target_field_is_unlabelled(tmp_path):
    data = dataset(tmp_path, [{"shape": "circle"}, {"shape": "star"}, {"colour": "red"}])
    assert [data[i]["target_mask"]["img"] for i in range(3)] == [True, True, False]


def test_error_line_counts_blank_lines(tmp_path):
    # read_jsonl skips blank lines; the dataset's "line N" must still be the line in the file.
    with pytest.raises(UserError, match="line 3"):
        dataset(tmp_path, [{"shape": "circle"}, "", {"shape": "blob"}])


def test_missing_image_column_is_user_error(tmp_path):
    with pytest.raises(UserError) as error:
        dataset(tmp_path, [{"shape": "circle"}], transform=ImageTransform())
    message = str(error.value)
    assert str(tmp_path / "train.jsonl") in message and "no column 'image'" in message


def test_rows_without_image_path_or_text_mark_the_modality_absent(tmp_path):
    from mtmm.data.tokenizer import train_wordpiece
    write_png(tmp_path / "a.png")
    records = [{"image": "a.png", "text": "a red star", "shape": "star"}, {"image": None, "text": "", "shape": "star"},
               {"text": "blue", "shape": "circle"}]
    data = dataset(tmp_path, records, transform=ImageTransform(), tokenizer=train_wordpiece(["a red star blue"]))
    batch = data.batch([0, 1, 2])
    assert batch["present"]["image"].tolist() == [True, False, False]
    assert batch["present"]["text"].tolist() == [True, False, True]
    assert batch["image"].shape == (3, 3, 6, 8) and batch["image"][1].sum() == 0  # a blank stands in


def test_labels_masked_and_accepted(tmp_path):
    records = [{"shape": "star", "match": True}, {"shape": "", "match": 0}, {"shape": None, "match": "same"},
               {"shape": 1, "match": None}]
    data = dataset(tmp_path, records, tasks=(SHAPE, MATCH))
    batch = data.batch(list(range(len(data))))
    assert batch["targets"]["img"].tolist() == [2, 0, 0, 1]
    assert batch["target_mask"]["img"].tolist() == [True, False, False, True]
    assert batch["targets"]["match"].tolist() == [1, 0, 1, 0]
    assert batch["target_mask"]["match"].tolist() == [True, True, True, False]
    assert batch["target_mask"]["img"].dtype == torch.bool and batch["targets"]["img"].dtype == torch.long


@pytest.mark.parametrize("garbage", [b"not a png at all", None], ids=["garbage", "missing"])
def test_unreadable_image_is_found_before_training(tmp_path, garbage):
    write_png(tmp_path / "good.png")
    if garbage is not None:
        (tmp_path / "bad.png").write_bytes(garbage)
    records = [{"image": "good.png", "shape": "star"}, {"image": "bad.png", "shape": "star"}]
    with pytest.raises(UserError) as error:
        dataset(tmp_path, records, transform=ImageTransform())
    message = str(error.value)
    assert str(tmp_path / "train.jsonl") in message and "line 2" in message and str(tmp_path / "bad.png") in message
    assert "column 'image'" in message


def test_unreadable_image_without_upfront_check_fails_when_loaded(tmp_path):
    write_png(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    manifest = write_manifest(tmp_path / "train.jsonl", [{"image": "good.png", "shape": "star"},
                                                         {"image": "bad.png", "shape": "star"}])
    data = ManifestDataset(read_jsonl(manifest), manifest, tmp_path, [SHAPE], ImageTransform(), check_images=False)
    assert data[0]["image"].shape == (1, 3, 6, 8)
    with pytest.raises(UserError, match="line 2: cannot read image"):
        data[1]


def test_bad_rows_skipped_and_counted(tmp_path):
    write_png(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"junk")
    records = [{"image": "good.png", "shape": "star"}, {"image": "bad.png", "shape": "star"},
               {"image": "good.png", "shape": "blob"}, {"image": "gone.png", "shape": "star"},
               {"image": "good.png", "shape": "circle"}]
    manifest = write_manifest(tmp_path / "train.jsonl", records)
    data = ManifestDataset(read_jsonl(manifest), manifest, tmp_path, [SHAPE], ImageTransform(), on_bad_sample="skip")
    assert len(data) == 2 and data.skipped == 3 and data.lines == [1, 5]
    assert (tmp_path / "bad.png").read_bytes() == b"junk"  # the user's files are never touched


def test_images_of_different_sizes_need_an_image_size(tmp_path):
    write_png(tmp_path / "a.png", size=(8, 6))
    write_png(tmp_path / "b.png", size=(10, 6))
    records = [{"image": "a.png", "shape": "star"}, {"image": "b.png", "shape": "star"}]
    with pytest.raises(UserError, match="data.image_size"):
        dataset(tmp_path, records, transform=ImageTransform())
    assert dataset(tmp_path, records, transform=ImageTransform(size=4)).batch([0, 1])["image"].shape == (2, 3, 4, 4)
    # Not checked up front (data.check_images=false): the batch that meets them says which file differs.
    manifest = tmp_path / "train.jsonl"
    unchecked = ManifestDataset(read_jsonl(manifest), manifest, tmp_path, [SHAPE], ImageTransform(), check_images=False)
    with pytest.raises(UserError, match=r"line 2: image .*b\.png is \(3, 6, 10\) but others are \(3, 6, 8\).*data\.image_size"):
        unchecked.batch([0, 1])


@pytest.mark.parametrize("mode, size, expected", [("RGB", None, (3, 6, 8)), ("L", None, (3, 6, 8)),
                                                  ("RGBA", 3, (3, 3, 3)), ("RGB", 12, (3, 12, 12))])
def test_image_transform(tmp_path, mode, size, expected):
    write_png(tmp_path / "a.png", mode=mode)
    with Image.open(tmp_path / "a.png") as image:
        tensor = ImageTransform(size=size)(image)
    assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == expected


def test_batch_pads_texts_to_its_longest_and_stacks(tmp_path):
    from mtmm.data.tokenizer import train_wordpiece
    for name in "abc":
        write_png(tmp_path / f"{name}.png", color=(ord(name), 0, 0))
    texts = ["red", "a big red star here", "blue star"]
    records = [{"image": f"{name}.png", "text": text, "shape": shape}
               for name, text, shape in zip("abc", texts, ["star", "", "circle"])]
    tokenizer = train_wordpiece(texts)
    data = dataset(tmp_path, records, transform=ImageTransform(), tokenizer=tokenizer)
    batch = data.batch([2, 0, 1])
    rows = [data.input_ids[i] for i in (2, 0, 1)]
    lengths = [len(ids) for ids in rows]
    ids, attention = batch["text"]["input_ids"], batch["text"]["attention_mask"]
    assert ids.shape == attention.shape == (3, max(lengths)) and ids.dtype == attention.dtype == torch.long
    assert attention.sum(1).tolist() == lengths and len(set(lengths)) == 3
    for row, n in enumerate(lengths):
        assert ids[row, :n].tolist() == rows[row]
        assert (ids[row, n:] == tokenizer.pad_token_id).all() and (attention[row, n:] == 0).all()
    padded = pad_token_ids(rows, tokenizer.pad_token_id)  # what robustness uses for corrupted texts
    assert all(torch.equal(padded[key], batch["text"][key]) for key in padded)
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (3, 3, 6, 8)
    assert batch["image"][:, 0, 0, 0].tolist() == [ord("c"), ord("a"), ord("b")]
    assert {m: p.tolist() for m, p in batch["present"].items()} == {"image": [True] * 3, "text": [True] * 3}
    assert batch["index"].tolist() == [2, 0, 1]
    assert batch["targets"]["img"].tolist() == [0, 2, 0] and batch["target_mask"]["img"].tolist() == [True, True, False]
    assert torch.equal(data[1]["image"], batch["image"][2:]) and data[1]["index"].tolist() == [1]  # a batch of one


def test_batch_without_modalities(tmp_path):
    data = dataset(tmp_path, [{"shape": "star"}, {"shape": "circle"}])
    batch = data.batch([1, 0])
    assert "image" not in batch and "text" not in batch and batch["present"] == {}
    assert batch["targets"]["img"].tolist() == [0, 2]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shapes-cache")  # the generated dataset is reused by every test below


def shapes_config(cache_dir: Path, *overrides: str):
    with initialize_config_module("mtmm.conf", version_base="1.3"):
        return compose("train", overrides=[f"data.source.cache_dir={cache_dir}", "data.source.train=40",
                                           "data.source.val=10", "data.source.test=10", *overrides])


def test_build_data_sizes_and_tokenised_texts(cache_dir):
    data = build_data(shapes_config(cache_dir, "encoder.text.max_length=8"))
    assert {split: len(ds) for split, ds in data.datasets.items()} == {"train": 40, "val": 10, "test": 10}
    assert [task.name for task in data.tasks] == ["img", "txt"]
    train = data.datasets["train"]
    assert len(train.input_ids) == 40  # tokenised once, at construction
    records = read_jsonl(train.manifest)
    for i in (0, 39):
        sample = train[i]
        ids = data.tokenizer(records[i]["text"], truncation=True, max_length=8)["input_ids"]
        assert train.input_ids[i] == ids and sample["text"]["input_ids"][0].tolist() == ids
        assert sample["image"].shape == (1, 3, 64, 64) and sample["image"].dtype == torch.uint8
        assert sample["targets"]["img"].tolist() == [SHAPE_NAMES.index(records[i]["shape"])]
    assert max(len(ids) for ids in train.input_ids) == 8
    # The vocabulary is learnt from the training split only, so val/test use the same tokenizer.
    assert data.datasets["val"].input_ids[0] == data.tokenizer(read_jsonl(data.datasets["val"].manifest)[0]["text"],
                                                                truncation=True, max_length=8)["input_ids"]


def test_build_data_without_text(cache_dir):
    data = build_data(shapes_config(cache_dir, "encoder/text=none"))
    train = data.datasets["train"]
    assert data.tokenizer is None and train.input_ids is None
    assert "text" not in train.batch([0, 1]) and "image" in train[0] and "text" not in train[0]["present"]


def test_build_data_without_image(cache_dir):
    data = build_data(shapes_config(cache_dir, "encoder/image=none"))
    sample = data.datasets["train"][0]
    assert "image" not in sample and "text" in sample and data.tokenizer is not None


def test_build_data_without_any_modality(cache_dir):
    with pytest.raises(UserError, match="at least one modality"):
        build_data(shapes_config(cache_dir, "encoder/image=none", "encoder/text=none"))


def test_build_data_from_checkpoint_tokenizer_files(cache_dir):
    cfg = shapes_config(cache_dir)
    full = build_data(cfg)
    val = build_data(cfg, splits=("val",), saved=full.state())
    assert list(val.datasets) == ["val"]
    assert val.datasets["val"].input_ids == full.datasets["val"].input_ids
