"""A checkpoint is data, never code: every way a crafted best.pt could make mtmm-eval (or resume=) run code, write
files or prompt is refused with one line before anything is built, and leaves no file behind."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_tiny
from hydra.utils import get_method
from omegaconf import OmegaConf

from mtmm.errors import UserError
from mtmm.eval import evaluate_checkpoint
from mtmm.trust import shipped_targets, trusted_config

BIN = Path(sys.executable).parent
SMALL = ["encoder.text.hidden_size=16", "encoder.text.intermediate_size=32", "trainer.epochs=1",
         "encoder/image=none", "tasks=txt"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny real checkpoint; each test crafts a hostile copy of it."""
    return train_tiny(tmp_path_factory.mktemp("trained"), *SMALL)


def crafted(trained: Path, folder: Path, edit_config=None, edit_state=None) -> Path:
    state = torch.load(trained, weights_only=True)
    if edit_config is not None:
        config = OmegaConf.to_container(OmegaConf.create(state["config"]))
        edit_config(config)
        state["config"] = OmegaConf.to_yaml(OmegaConf.create(config))
    if edit_state is not None:
        edit_state(state)
    path = folder / "hostile.pt"
    torch.save(state, path)
    return path


def refused(checkpoint: Path, folder: Path, match: str, **options) -> None:
    with pytest.raises(UserError, match=match) as caught:
        evaluate_checkpoint(checkpoint, run_dir=folder / "eval", device="cpu", cache_dir=folder / "cache", **options)
    assert "\n" not in str(caught.value)
    assert not (folder / "eval").exists()


def writes_canary(canary: Path) -> dict:
    """A payload that, if built, creates `canary`: exec of Python source."""
    return {"_target_": "builtins.exec", "_args_": [f"open({str(canary)!r}, 'w').write('owned')"]}


# A nested _target_ under every config group the checkpoint's config builds from (and one it never builds).
GROUPS = ["data.source", "encoder.text", "encoder.text.tokenizer", "fusion", "mtl", "loss", "tasks.txt"]


def node(config: dict, dotted: str) -> dict:
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("group", GROUPS)
def test_a_foreign_target_under_any_group_is_refused_before_anything_runs(trained, tmp_path, group):
    canary = tmp_path / "canary"
    checkpoint = crafted(trained, tmp_path, lambda config: node(config, group).update(writes_canary(canary)))
    refused(checkpoint, tmp_path, rf"{group}\._target_ names 'builtins\.exec', which is not one of mtmm's builders")
    assert not canary.exists()


@pytest.mark.parametrize("where", ["argument", "list", "args"])
def test_a_target_wrapped_inside_an_argument_of_an_allowed_builder_is_refused(trained, tmp_path, where):
    canary = tmp_path / "canary"

    def edit(config):
        if where == "argument":  # LateFusion keeps its own target; one of its arguments builds the payload
            config["fusion"]["dropout"] = writes_canary(canary)
        elif where == "list":
            config["fusion"]["extra"] = [1, {"deeper": writes_canary(canary)}]
        else:
            config["mtl"]["_args_"] = [writes_canary(canary)]

    refused(crafted(trained, tmp_path, edit), tmp_path, "builtins.exec")
    assert not canary.exists()


@pytest.mark.parametrize("target, argument", [("os.remove", "victim"), ("shutil.rmtree", "victim-folder"),
                                              ("pathlib.Path.write_text", "new-file"), ("pickle.loads", None),
                                              ("hydra.utils.get_method", None)])
def test_targets_that_write_delete_or_unpickle_are_refused(trained, tmp_path, target, argument):
    (tmp_path / "victim").write_text("user data")
    (tmp_path / "victim-folder").mkdir()
    payload = {"_target_": target, "_args_": [str(tmp_path / argument)] if argument else [b"x".hex()]}
    checkpoint = crafted(trained, tmp_path, lambda config: config["loss"].update(payload))
    refused(checkpoint, tmp_path, f"names '{target}'")
    assert (tmp_path / "victim").read_text() == "user data" and (tmp_path / "victim-folder").is_dir()
    assert not (tmp_path / "new-file").exists()


@pytest.mark.parametrize("value", ["${oc.env:HOME}", "prefix ${oc.env:AWS_SECRET_ACCESS_KEY} suffix", "${..train}",
                                   "${oc.decode:'{a: 1}'}"])
def test_interpolations_are_never_evaluated(trained, tmp_path, value):
    checkpoint = crafted(trained, tmp_path, lambda config: config["data"]["source"].update(seed=value))
    refused(checkpoint, tmp_path, r"data\.source\.seed = .* holds an interpolation")


def test_an_interpolation_in_a_key_is_refused(trained, tmp_path):
    checkpoint = crafted(trained, tmp_path, lambda config: config["trainer"].update({"${oc.env:HOME}": 1}))
    refused(checkpoint, tmp_path, "holds an interpolation")


@pytest.mark.parametrize("name", ["../evil.json", "/tmp/mtmm-absolute-evil.json", "sub/tokenizer.json", "..",
                                  "tokenizer.json/../../x", "config.json", ""])
def test_tokenizer_file_names_with_paths_or_outside_the_fixed_set_are_refused(trained, tmp_path, name):
    def edit(state):
        state["data"]["tokenizer_files"][name] = "{}"

    refused(crafted(trained, tmp_path, edit_state=edit), tmp_path, "tokenizer file name .* is not allowed")
    assert not Path("/tmp/mtmm-absolute-evil.json").exists() and not (tmp_path.parent / "evil.json").exists()


@pytest.mark.parametrize("key", ["auto_map", "trust_remote_code"])
def test_a_tokenizer_config_asking_for_custom_code_is_refused_without_a_prompt(trained, tmp_path, key):
    def edit(state):
        files = state["data"]["tokenizer_files"]
        config = json.loads(files["tokenizer_config.json"])
        config[key] = {"AutoTokenizer": ["evil.EvilTokenizer", None]} if key == "auto_map" else True
        files["tokenizer_config.json"] = json.dumps(config)
        files["evil.py"] = "open('owned', 'w')"

    refused(crafted(trained, tmp_path, edit_state=edit), tmp_path, "not allowed|custom code")
    config_only = crafted(trained, tmp_path, edit_state=lambda state: edit(state) or
                          state["data"]["tokenizer_files"].pop("evil.py"))
    refused(config_only, tmp_path, rf"tokenizer_config\.json asks for custom code \('{key}'\)")


@pytest.mark.parametrize("damage", ["no data", "no classes", "stats", "no model"])
def test_a_malformed_data_entry_is_one_line_not_a_key_error(trained, tmp_path, damage):
    def edit(state):
        if damage == "no data":
            del state["data"]
        elif damage == "no classes":
            state["data"]["classes"] = {}
        elif damage == "stats":
            state["data"]["stats"]["txt"] = "mean"
        else:
            state["model"] = [1, 2]

    refused(crafted(trained, tmp_path, edit_state=edit), tmp_path, "data entry|model weights")


def test_a_text_config_asking_for_custom_code_is_refused(trained, tmp_path):
    from mtmm.models.hf import model_from_saved_config
    with pytest.raises(UserError, match="asks for custom code"):
        model_from_saved_config(json.dumps({"model_type": "bert", "auto_map": {"AutoModel": "evil.Model"}}))
    with pytest.raises(UserError, match="describes no model transformers knows"):
        model_from_saved_config(json.dumps({"model_type": "evil-remote-model"}))


def test_the_checkpoints_cache_folders_are_not_written_the_users_are(trained, tmp_path):
    elsewhere = tmp_path / "chosen-by-the-checkpoint"

    def edit(config):
        config["data"]["source"]["cache_dir"] = str(elsewhere)
        config["data"]["image_cache_dir"] = str(elsewhere / "images")
        config["trainer"]["feature_cache_dir"] = str(elsewhere / "features")

    metrics = evaluate_checkpoint(crafted(trained, tmp_path, edit), run_dir=tmp_path / "eval", device="cpu",
                                  cache_dir=tmp_path / "mine")
    assert metrics["txt"]["count"] == 32
    assert not elsewhere.exists() and list((tmp_path / "mine").glob("shapes-*"))


def test_user_trusted_targets_come_from_the_command_line_only():
    text = "fusion:\n  _target_: mypkg.fusions.MyFusion\n"
    with pytest.raises(UserError, match=r"trusted_targets=\[mypkg.fusions.MyFusion\]"):
        trusted_config(text, "checkpoint x.pt")
    assert trusted_config(text, "x", ["mypkg.fusions.MyFusion"]).fusion._target_ == "mypkg.fusions.MyFusion"
    assert trusted_config(text, "x", ["mypkg."]).fusion._target_ == "mypkg.fusions.MyFusion"  # a whole package
    with pytest.raises(UserError):
        trusted_config(text, "x", ["mypkg"])  # without the dot: that name exactly, not a prefix
    with pytest.raises(UserError, match="trusted_targets"):  # a config cannot widen the list itself
        trusted_config(text + "trusted_targets: [mypkg.]\n", "x")


def test_the_allow_list_is_every_builder_the_shipped_configs_use():
    targets = shipped_targets()
    assert {"mtmm.models.fusion.LateFusion", "mtmm.data.sources.manifest", "mtmm.weighting.static.StaticWeighting",
            "mtmm.data.tokenizer.train_wordpiece"} <= targets
    assert all(target.startswith("mtmm.") for target in targets)
    for target in targets:
        assert callable(get_method(target)), target


def test_checkpoints_are_written_with_the_users_umask(trained, tmp_path):
    from mtmm.checkpoint import save_checkpoint
    previous = os.umask(0o022)
    try:
        save_checkpoint({"step": 1}, tmp_path / "shared.pt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "shared.pt").stat().st_mode) == 0o644
    assert stat.S_IMODE(trained.stat().st_mode) == 0o666 & ~previous


@pytest.mark.slow
def test_mtmm_eval_of_a_hostile_checkpoint_exits_non_zero_with_one_line_and_leaves_nothing(trained, tmp_path):
    canary = tmp_path / "canary"
    checkpoint = crafted(trained, tmp_path, lambda config: config["encoder"]["text"].update(writes_canary(canary)))
    result = subprocess.run([str(BIN / "mtmm-eval"), f"checkpoint={checkpoint}", f"hydra.run.dir={tmp_path / 'eval'}",
                             "device=cpu"], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    output = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2 and len(output) == 1, output
    assert "encoder.text._target_ names 'builtins.exec'" in output[0]
    assert not canary.exists() and not (tmp_path / "eval").exists()
