"""The installed commands, as a user runs them: from another directory, as real subprocesses."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
TINY = ["data.source.train=64", "data.source.val=32", "data.source.test=32", "data.batch_size=32",
        "trainer.epochs=1", "device=cpu"]


def run(command: str, *args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MTMM_CACHE": str(cache)}
    return subprocess.run([str(BIN / command), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_train_then_eval_from_any_directory(tmp_path, shapes_cache):
    work = tmp_path / "elsewhere"
    work.mkdir()
    trained = run("mtmm-train", "fusion=late", "tasks=img+txt", *TINY, cwd=work, cache=shapes_cache)
    assert trained.returncode == 0, trained.stderr
    (run_dir,) = (work / "outputs").glob("*/*")
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "train.log").is_file()
    assert "epoch 1/1" in (run_dir / "train.log").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())

    evaluated = run("mtmm-eval", f"checkpoint={run_dir}/checkpoints/best.pt", "device=cpu", cwd=work,
                    cache=shapes_cache)
    assert evaluated.returncode == 0, evaluated.stderr
    (eval_dir,) = (work / "outputs").glob("*/*-eval")
    assert json.loads((eval_dir / "metrics.json").read_text())["metrics"] == summary["best"]["test"]
    assert len((eval_dir / "predictions.jsonl").read_text().splitlines()) == 32
    assert "test      img: accuracy" in evaluated.stdout


@pytest.mark.slow
def test_sweep_makes_one_run_folder_per_job(tmp_path, shapes_cache):
    swept = run("mtmm-train", "-m", "fusion=early,late,middle", "tasks=img+txt+match", *TINY, cwd=tmp_path,
                cache=shapes_cache)
    assert swept.returncode == 0, swept.stderr
    jobs = sorted((tmp_path / "multirun").glob("*/*/[0-9]"))
    assert [job.name for job in jobs] == ["0", "1", "2"]
    fusions = [json.loads((job / "summary.json").read_text()) and
               (job / ".hydra" / "overrides.yaml").read_text() for job in jobs]
    assert ["fusion=early" in fusions[0], "fusion=late" in fusions[1], "fusion=middle" in fusions[2]] == [True] * 3
    for job in jobs:
        assert (job / "checkpoints" / "best.pt").is_file()


def test_config_errors_exit_non_zero_with_hydra_message(tmp_path, shapes_cache):
    typo = run("mtmm-train", "trainer.epoch=3", cwd=tmp_path, cache=shapes_cache)
    assert typo.returncode != 0 and "trainer.epoch" in typo.stderr + typo.stdout
    unknown = run("mtmm-train", "fusion=nope", cwd=tmp_path, cache=shapes_cache)
    assert unknown.returncode != 0 and "Available options in 'fusion'" in unknown.stderr + unknown.stdout


@pytest.mark.parametrize("content, reason", [(None, "does not exist"), (b"", "empty"), (b'{"a": 1}', "not a torch file"),
                                             ("truncated", "truncated or corrupt"), ("foreign", "not an mtmm checkpoint")])
def test_bad_checkpoints_fail_in_one_line(tmp_path, shapes_cache, content, reason):
    path = tmp_path / "model.pt"
    if content == "truncated":
        import torch
        torch.save({"format": "mtmm-checkpoint", "model": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:500])
    elif content == "foreign":
        import torch
        torch.save({"state_dict": {}}, path)
    elif content is not None:
        path.write_bytes(content)
    before = path.read_bytes() if path.exists() else None
    result = run("mtmm-eval", f"checkpoint={path}", cwd=tmp_path, cache=shapes_cache)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2
    assert reason in output and "Traceback" not in output and len(output.splitlines()) == 1
    assert (path.read_bytes() if path.exists() else None) == before  # the user's file is left alone


def test_wheel_ships_the_configs(tmp_path):
    """The configs must be inside the package, not only in the source tree, so a wheel install finds them."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("mtmm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in ("mtmm/conf/train.yaml", "mtmm/conf/eval.yaml", "mtmm/conf/tasks/img+txt.yaml",
                   "mtmm/conf/encoder/image/cnn.yaml", "mtmm/conf/fusion/middle.yaml", "mtmm/conf/__init__.py"):
        assert config in names, config


@pytest.mark.slow
def test_eval_with_robustness_writes_table_and_plot(tmp_path, shapes_cache):
    trained = run("mtmm-train", "tasks=img+txt", *TINY, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                  cache=shapes_cache)
    assert trained.returncode == 0, trained.stderr
    evaluated = run("mtmm-eval", f"checkpoint={tmp_path / 'run'}/checkpoints/best.pt", "robustness=true",
                    "robustness_levels=[0.0,0.5,1.0]", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path,
                    cache=shapes_cache)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads((tmp_path / "eval" / "robustness.json").read_text())
    assert set(result["missing"]) == {"image", "text"}
    assert result["corruptions"]["word_drop"]["levels"] == [0.0, 0.5, 1.0]
    assert result["clean"] == json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    from PIL import Image
    with Image.open(tmp_path / "eval" / "robustness.png") as plot:
        assert plot.width > 400 and plot.height > 200


@pytest.mark.slow
def test_optuna_search_and_joblib_launcher(tmp_path, shapes_cache):
    """The optional sweep plugins (installed with the dev extra): Optuna maximises what train() returns."""
    searched = run("mtmm-train", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *TINY, cwd=tmp_path,
                   cache=shapes_cache)
    assert searched.returncode == 0, searched.stderr
    (results,) = (tmp_path / "multirun").glob("*/*/optimization_results.yaml")
    from omegaconf import OmegaConf
    best = OmegaConf.load(results)
    values = [json.loads((job / "summary.json").read_text())["monitor_value"] for job in results.parent.glob("[0-9]")]
    assert best.best_value == max(values) and set(best.best_params) == {"optim.lr", "optim.weight_decay", "fusion"}

    parallel = run("mtmm-train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "fusion=early,late", *TINY,
                   f"hydra.sweep.dir={tmp_path / 'parallel'}", cwd=tmp_path, cache=shapes_cache)
    assert parallel.returncode == 0, parallel.stderr
    assert sorted(job.name for job in (tmp_path / "parallel").glob("[0-9]")) == ["0", "1"]
    assert all((job / "summary.json").is_file() for job in (tmp_path / "parallel").glob("[0-9]"))
