"""data.source.label_fraction: a seeded share of the training samples keeps a label, the rest have none for it."""

import pytest

from mtmm.build import instantiate
from mtmm.data.build import build_data
from mtmm.data.sources import shapes
from mtmm.errors import UserError

COUNTS = dict(train=400, val=40, test=40)


def labelled(records: list[dict], field: str) -> list[str]:
    return [record["id"] for record in records if record[field] is not None]


def test_share_of_training_labels_is_kept_and_others_untouched(shapes_cache):
    full = shapes(str(shapes_cache), **COUNTS)
    partial = shapes(str(shapes_cache), **COUNTS, label_fraction={"img": 0.05, "size": 0.5})
    assert len(labelled(partial.records["train"], "shape")) == 20  # img reads the manifest field `shape`
    assert len(labelled(partial.records["train"], "size")) == 200
    kept = {record["id"]: record for record in partial.records["train"] if record["shape"] is not None}
    for record in full.records["train"]:  # the labels kept are the true ones; the other fields all stay
        if record["id"] in kept:
            assert kept[record["id"]]["shape"] == record["shape"]
    for field in ("colour", "sentiment", "match", "tags"):
        assert len(labelled(partial.records["train"], field)) == COUNTS["train"]
    for split in ("val", "test"):
        assert partial.records[split] == full.records[split]
    assert partial.image_root == full.image_root  # masking happens on reading: the generated folder is shared
    assert all(record["shape"] is not None for record in full.records["train"])  # the unmasked read is intact


def test_same_seed_same_samples_other_seed_others(shapes_cache):
    first = shapes(str(shapes_cache), **COUNTS, label_fraction={"shape": 0.1})
    again = shapes(str(shapes_cache), **COUNTS, label_fraction={"img": 0.1})  # task name or field: the same
    other = shapes(str(shapes_cache), seed=1, **COUNTS, label_fraction={"shape": 0.1})
    ids = labelled(first.records["train"], "shape")
    assert ids == labelled(again.records["train"], "shape")
    assert ids != labelled(other.records["train"], "shape") and len(labelled(other.records["train"], "shape")) == 40


def test_training_sees_the_partial_labels(make_cfg):
    cfg = make_cfg("tasks=img", "data.source.label_fraction={img:0.25}")
    data = build_data(cfg)
    assert int(data.datasets["train"].target_mask["img"].sum()) == 24  # of the tiny 96
    assert bool(data.datasets["val"].target_mask["img"].all()) and bool(data.datasets["test"].target_mask["img"].all())


@pytest.mark.parametrize("fraction, words", [
    ({"shap": 0.1}, ["label_fraction.shap", "img = shape", "tags"]),
    ({"img": 1.5}, ["label_fraction.img=1.5", "(0, 1]"]),
    ({"img": 0}, ["label_fraction.img=0", "(0, 1]"]),
    ({"img": "half"}, ["label_fraction.img='half'", "(0, 1]"]),
    ({"img": 0.001}, ["keeps no label of the 400", "at least 0.0025"]),
    (0.05, ["label_fraction=0.05", "{img:0.05}"]),
])
def test_a_bad_value_is_one_line_naming_the_key_and_what_is_accepted(shapes_cache, fraction, words):
    with pytest.raises(UserError) as error:
        shapes(str(shapes_cache), **COUNTS, label_fraction=fraction)
    message = str(error.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_the_config_option_reaches_the_source(make_cfg):
    source = instantiate(make_cfg("data.source.label_fraction={tags:0.5}").data.source)
    assert len(labelled(source.records["train"], "tags")) == 48
