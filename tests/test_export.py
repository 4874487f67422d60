"""mtmm-export: a safetensors folder mtmm-eval scores exactly as it scores the .pt, an ONNX model onnxruntime runs as
PyTorch does (fed by the README's recipe, without mtmm), and folders that are data: a hostile one is refused in one
line, and a folder holding a user's file is never written into."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_tiny
from omegaconf import OmegaConf
from PIL import Image

from mtmm import export
from mtmm.atomic import current_umask
from mtmm.build import build_model
from mtmm.data.build import build_data, build_loader
from mtmm.checkpoint import load_checkpoint
from mtmm.errors import UserError
from mtmm.eval import evaluate_checkpoint
from mtmm.export import export_checkpoint
from mtmm.trust import own_cache_dirs, trusted_config, use_own_cache_dirs

# Both modalities (the ONNX graph takes all five inputs), one BERT layer: the exporter's time grows with the graph.
SMALL = ["encoder.text.hidden_size=16", "encoder.text.intermediate_size=32", "encoder.text.num_layers=1",
         "trainer.epochs=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny real checkpoint, exported once per format below."""
    return train_tiny(tmp_path_factory.mktemp("trained"), *SMALL)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("safetensors") / "model"
    export_checkpoint(trained, "safetensors", out)
    return out


@pytest.fixture(scope="module")
def onnx_exported(trained, tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="format=onnx needs the export extra: pip install 'mtmm[export]'")
    out = tmp_path_factory.mktemp("onnx") / "model"
    return out, export_checkpoint(trained, "onnx", out)


def test_eval_of_the_export_equals_eval_of_the_checkpoint(trained, exported, tmp_path):
    scored = {}
    for name, checkpoint in (("pt", trained), ("export", exported)):
        metrics = evaluate_checkpoint(checkpoint, run_dir=tmp_path / name, device="cpu", cache_dir=tmp_path / "cache")
        scored[name] = (metrics, (tmp_path / name / "predictions.jsonl").read_bytes())
    assert scored["export"] == scored["pt"]
    written = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in scored}
    assert [written["export"][key] for key in ("epoch", "step")] == [written["pt"][key] for key in ("epoch", "step")]


def test_the_folder_loads_as_the_checkpoints_state(trained, exported):
    original, loaded = load_checkpoint(trained), load_checkpoint(exported)
    for key in ("format", "version", "config", "data", "text_config", "epoch", "step", "metrics"):
        assert loaded[key] == original[key], key
    assert loaded["model"].keys() == original["model"].keys()
    assert all(torch.equal(loaded["model"][name], tensor) for name, tensor in original["model"].items())


def test_the_folder_holds_fixed_names_a_model_card_and_shareable_files(exported):
    assert sorted(path.name for path in exported.iterdir()) == [
        "README.md", "config.yaml", "export.json", "labels.json", "model.safetensors", "text_config.json",
        "tokenizer.json", "tokenizer_config.json"]
    card = (exported / "README.md").read_text()
    assert "| img | multiclass | circle, square, triangle, star, cross, diamond |" in card
    assert "val txt: accuracy" in card and "mtmm.data.sources.shapes" in card
    assert "tokenizer_files" not in json.loads((exported / "labels.json").read_text())
    assert stat.S_IMODE((exported / "model.safetensors").stat().st_mode) == 0o666 & ~current_umask()


def test_onnx_matches_pytorch_within_1e4(onnx_exported):
    out, result = onnx_exported
    assert sorted(path.name for path in out.iterdir()) == [
        "README.md", "config.yaml", "export.json", "labels.json", "model.onnx", "text_config.json", "tokenizer.json",
        "tokenizer_config.json"]
    assert result["max_abs_difference"] <= 1e-4
    written = json.loads((out / "export.json").read_text())["onnx_check"]
    assert written["max_abs_difference"] == result["max_abs_difference"] and written["samples"] == 32


def test_the_readme_recipe_feeds_onnxruntime_as_mtmm_feeds_pytorch(trained, onnx_exported, tmp_path):
    """Inputs made as the README says, with PIL, numpy and tokenizers only, at another batch size than the export's."""
    import onnxruntime
    from tokenizers import Tokenizer

    out, _ = onnx_exported
    state = load_checkpoint(trained)
    cfg = trusted_config(state["config"], "test")
    use_own_cache_dirs(cfg, own_cache_dirs(tmp_path / "cache"))
    data = build_data(cfg, splits=("test",), saved=state["data"])
    model = build_model(cfg, data.tasks, data.tokenizer, checkpoint=state)
    model.load_state_dict(state["model"])
    model.eval()
    with torch.no_grad():
        expected = model(next(iter(build_loader(cfg, data, "test", device=torch.device("cpu")))))

    dataset, rows = data.datasets["test"], slice(0, 7)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=cfg.encoder.text.max_length)
    encoded = [tokenizer.encode(text).ids for text in dataset.texts[rows]]
    length = max(map(len, encoded))
    feed = {"image": np.stack([np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
                               for path in dataset.image_paths[rows]]),
            "image_present": np.array([path is not None for path in dataset.image_paths[rows]]),
            "input_ids": np.array([ids + [0] * (length - len(ids)) for ids in encoded], dtype=np.int64),
            "attention_mask": np.array([[1] * len(ids) + [0] * (length - len(ids)) for ids in encoded], dtype=np.int64),
            "text_present": np.array([bool(text) for text in dataset.texts[rows]])}
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for task, logits in zip(model.heads, session.run(list(model.heads), feed)):
        assert np.abs(logits - expected[task][rows].numpy()).max() <= 1e-4, task


def test_an_onnx_export_is_not_read_as_a_checkpoint(onnx_exported, tmp_path):
    refused(onnx_exported[0], tmp_path, "format=onnx is for onnxruntime")


def refused(folder: Path, tmp_path: Path, match: str, **options) -> None:
    with pytest.raises(UserError, match=match) as caught:
        evaluate_checkpoint(folder, run_dir=tmp_path / "eval", device="cpu", cache_dir=tmp_path / "cache", **options)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "eval").exists()


def hostile(exported: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "hostile"
    shutil.copytree(exported, folder)
    edit(folder)
    return folder


@pytest.mark.parametrize("edit, match", [
    (lambda f: (f / "modeling_mtmm.py").write_text("import os"), "holds 'modeling_mtmm.py', which is not a file"),
    (lambda f: ((f / "sub").mkdir(), shutil.move(f / "tokenizer.json", f / "sub" / "tokenizer.json")),
     "holds 'sub', which is not a file"),
    (lambda f: ((f / "vocab.txt").symlink_to(f.parent / "secret.txt")), "vocab.txt is a link or a folder"),
    (lambda f: (f / "labels.json").write_text(json.dumps({**json.loads((f / "labels.json").read_text()),
                                                          "tokenizer_files": {"../../x": "y"}})),
     "holds tokenizer_files"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]),
     "model.safetensors cannot be read"),
    (lambda f: (f / "export.json").unlink(), "not an mtmm export \\(no export.json\\)"),
])
def test_a_hostile_export_folder_is_refused_in_one_line(exported, tmp_path, edit, match):
    (tmp_path / "secret.txt").write_text("the user's")
    refused(hostile(exported, tmp_path, edit), tmp_path, match)


def test_a_foreign_target_in_the_folders_config_is_refused_before_anything_runs(exported, tmp_path):
    canary = tmp_path / "canary"

    def edit(folder: Path) -> None:
        config = OmegaConf.load(folder / "config.yaml")
        config.fusion.dropout = {"_target_": "builtins.exec", "_args_": [f"open({str(canary)!r}, 'w').write('x')"]}
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(config))

    refused(hostile(exported, tmp_path, edit), tmp_path, r"fusion\.dropout\._target_ names 'builtins\.exec'")
    assert not canary.exists()


def test_out_holding_a_users_file_is_refused_and_the_file_untouched(trained, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"already holds files \(notes\.txt\)") as caught:
        export_checkpoint(trained, "safetensors", out)
    assert "\n" not in str(caught.value)
    assert [path.name for path in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_a_failed_export_leaves_nothing_behind(trained, tmp_path, monkeypatch):
    def full_disk(weights, path):
        path.write_bytes(b"half")
        raise UserError("disk full")

    monkeypatch.setattr(export, "save_weights", full_disk)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        with pytest.raises(UserError, match="disk full"):
            export_checkpoint(trained, "safetensors", out)
    assert not (tmp_path / "new").exists() and list((tmp_path / "empty").iterdir()) == []


def test_the_command_refuses_a_used_out_folder_with_exit_2(trained, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    done = subprocess.run([sys.executable, "-m", "mtmm.export", f"checkpoint={trained}", f"out={out}"], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "MTMM_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 2, done.stderr
    assert "already holds files (notes.txt)" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine"]  # Hydra wrote nothing either
