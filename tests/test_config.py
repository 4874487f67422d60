"""The Hydra config tree: every option composes, struct mode rejects typos, presets hold what they say."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import mtmm.conf

CONF = Path(mtmm.conf.__file__).parent


def compose_train(*overrides):
    with initialize_config_module("mtmm.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_defaults_are_the_documented_ones():
    cfg = compose_train()
    assert cfg.encoder.image._target_ == "mtmm.models.image.SmallCNN"
    assert cfg.encoder.text._target_ == "mtmm.models.text.bert_tiny"
    assert cfg.fusion._target_ == "mtmm.models.fusion.LateFusion"
    assert list(cfg.tasks) == ["img", "txt"]
    assert cfg.loss._target_ == "mtmm.weighting.static.StaticWeighting"
    assert cfg.device.type == "auto" and cfg.device.precision == "fp32"
    assert cfg.data.source.train == 4000 and cfg.data.source.image_size == 64


REQUIRED = {"manifest": ["data.source.train=rows.csv"], "hateful_memes": ["data.source.root=x"],
            "crisismmd": ["data.source.root=x"], "mmimdb": ["data.source.root=x"]}


@pytest.mark.parametrize("group", ["encoder/image", "encoder/text", "fusion", "mtl", "tasks", "loss", "device",
                                   "optim", "sched", "data"])
def test_every_option_of_every_group_composes(group):
    for path in sorted((CONF / group).glob("*.yaml")):
        cfg = compose_train(f"{group}={path.stem}", *(REQUIRED.get(path.stem, []) if group == "data" else []))
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("preset, tasks", [("img", ["img"]), ("txt", ["txt"]), ("img+txt", ["img", "txt"]),
                                           ("img+txt+match", ["img", "txt", "match"])])
def test_task_presets(preset, tasks):
    cfg = compose_train(f"tasks={preset}")
    assert list(cfg.tasks) == tasks
    for name in tasks:
        assert cfg.tasks[name].weight == 1.0 and cfg.tasks[name].type in ("multiclass", "binary")


def test_the_scarce_label_preset_pairs_size_with_related_image_tasks():
    cfg = compose_train("tasks=img+size+tags", "data.source.label_fraction={size:0.05}")
    assert list(cfg.tasks) == ["img", "size", "tags"]
    assert [cfg.tasks[name].type for name in cfg.tasks] == ["multiclass", "regression", "multilabel"]
    assert cfg.data.source.label_fraction == {"size": 0.05}


def test_single_task_weight_override_from_the_command_line():
    cfg = compose_train("tasks=img+txt+match", "tasks.match.weight=2.5")
    assert cfg.tasks.match.weight == 2.5 and cfg.tasks.img.weight == 1.0


def test_a_typo_in_a_key_is_an_error():
    with pytest.raises(ConfigCompositionException, match="trainer.epoch"):
        compose_train("trainer.epoch=3")


def test_an_unknown_option_lists_the_valid_ones():
    with pytest.raises(Exception) as info:
        compose_train("fusion=nope")
    message = str(info.value)
    assert "fusion/nope" in message and all(name in message for name in ("early", "late", "middle"))


def test_every_config_file_documents_its_keys_and_launch_command():
    for path in sorted(CONF.rglob("*.yaml")):
        text = path.read_text()
        assert text.startswith("#") and ("mtmm-train" in text or "mtmm-eval" in text), f"{path}: no header"
        for line in text.splitlines():
            stripped = line.strip()
            is_key = ":" in stripped and not stripped.startswith(("#", "-")) and stripped != "defaults:"
            assert not is_key or "#" in line, f"{path}: no comment on {line!r}"
