"""scripts/sweep_table.py and scripts/delta_m.py on run folders written by real (tiny) training runs."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from conftest import TINY
from mtmm.train import train

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
from delta_m import delta_m  # noqa: E402
from sweep_table import config_value  # noqa: E402


@pytest.fixture(scope="module")
def runs(shapes_cache, tmp_path_factory):
    """A two-job sweep (loss=static,uncertainty on img+txt) and two single-task baselines, laid out as mtmm-train -m
    lays them out. In-process runs get no .hydra/overrides.yaml, so it is written here as Hydra writes it."""
    root = tmp_path_factory.mktemp("runs")
    jobs = {"multirun/sweep/0": ["loss=static", "trainer.epochs=1"],
            "multirun/sweep/1": ["loss=uncertainty", "trainer.epochs=1"],
            "baselines/0": ["tasks=img", "trainer.epochs=1"], "baselines/1": ["tasks=txt", "trainer.epochs=1"]}
    for folder, overrides in jobs.items():
        with initialize_config_module("mtmm.conf", version_base="1.3"):
            cfg = compose("train", overrides=[f"data.source.cache_dir={shapes_cache}", *TINY, *overrides])
        train(cfg, run_dir=root / folder)
        (root / folder / ".hydra").mkdir()
        (root / folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {item}\n" for item in overrides))
    return root


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def script(name: str, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


def test_delta_m_by_hand():
    single = {"img": {"accuracy": 0.8}, "size": {"mae": 2.0}}
    metrics = {"img": ["accuracy"], "size": ["mae"]}
    # higher accuracy is better, lower mae is better: both are improvements here
    assert delta_m({"img": {"accuracy": 0.88}, "size": {"mae": 1.5}}, single, metrics) == pytest.approx(17.5)
    assert delta_m({"img": {"accuracy": 0.72}, "size": {"mae": 2.6}}, single, metrics) == pytest.approx(-20.0)
    assert delta_m({"img": {"accuracy": 0.8}, "size": {"mae": 2.0}}, single, metrics) == 0
    # every listed metric counts once: (+10 % accuracy, -50 % loss is better by 50 %) / 2
    two = {"img": ["accuracy", "loss"]}
    assert delta_m({"img": {"accuracy": 0.88, "loss": 0.5}}, {"img": {"accuracy": 0.8, "loss": 1.0}}, two) == \
        pytest.approx(30.0)


def test_delta_m_names_what_cannot_be_compared():
    with pytest.raises(ValueError, match="'size' has no single-task baseline"):
        delta_m({"img": {"accuracy": 0.9}, "size": {"mae": 1.0}}, {"img": {"accuracy": 0.8}},
                {"img": ["accuracy"], "size": ["mae"]})
    with pytest.raises(ValueError, match="img/macro_f1"):
        delta_m({"img": {"accuracy": 0.9}}, {"img": {"accuracy": 0.8}}, {"img": ["macro_f1"]})


def test_config_value_gives_short_names():
    assert config_value({"loss": {"_target_": "mtmm.weighting.loss_based.Uncertainty"}}, "loss") == "uncertainty"
    assert config_value({"loss": {"_target_": "mtmm.weighting.static.StaticWeighting"}}, "loss") == "static"
    assert config_value({"loss": {"_target_": "x.GradientCombination", "method": "pcgrad"}}, "loss") == "pcgrad"
    assert config_value({"fusion": {"_target_": "mtmm.models.fusion.LateFusion"}}, "fusion") == "LateFusion"
    assert config_value({"trainer": {"epochs": 3}}, "trainer.epochs") == "3"
    assert config_value({}, "mtl") == "–"


def test_sweep_table_rows_match_the_summaries(runs):
    sweep = runs / "multirun" / "sweep"
    result = script("sweep_table.py", sweep, "--baseline", "loss=static", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["run"] for row in rows] == ["loss=static", "loss=uncertainty"]  # the shared override is left out
    times = []
    for row, job in zip(rows, ("0", "1")):
        best_test = summary(sweep / job)["best"]["test"]
        assert row["img/accuracy"] == best_test["img"]["accuracy"]
        assert row["txt/accuracy"] == best_test["txt"]["accuracy"]
        assert row["mean/accuracy"] == best_test["mean"]["accuracy"]
        times.append(summary(sweep / job)["wall_time_s"] / 3)  # 96 samples / batch 32, one epoch: 3 steps
        assert row["s/step"] == pytest.approx(times[-1])
        assert row["folder"] == str(sweep / job)
    assert rows[0]["× static"] == pytest.approx(1.0) and rows[1]["× static"] == pytest.approx(times[1] / times[0])

    table = script("sweep_table.py", sweep, "--by", "loss,fusion", "--which", "final", "--split", "val",
                   "--baseline", "loss=static").stdout.splitlines()
    assert table[0] == ("| loss | fusion | img/accuracy | txt/accuracy | mean/accuracy | s/step | × static | folder |")
    final_val = summary(sweep / "1")["final"]["val"]
    assert table[3].startswith(f"| uncertainty | LateFusion | {final_val['img']['accuracy']:.4f} | "
                               f"{final_val['txt']['accuracy']:.4f} | {final_val['mean']['accuracy']:.4f} | ")
    assert table[2].startswith("| static | LateFusion |") and "| 1.00× |" in table[2]


def test_sweep_table_over_several_dirs_prints_missing_values_as_dash(runs):
    result = script("sweep_table.py", runs / "baselines", runs / "multirun")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "| run | img/accuracy | txt/accuracy | mean/accuracy | s/step | folder |"
    assert len(lines) == 2 + 4 and lines[2].startswith("| tasks=img | ") and lines[4].startswith("| loss=static | ")
    assert lines[2].split(" | ")[2] == "–"  # the img baseline has no txt accuracy


def test_delta_m_cli_matches_the_summaries(runs):
    result = script("delta_m.py", "--baselines", runs / "baselines", "--runs", runs / "multirun", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    base_img = summary(runs / "baselines" / "0")["best"]["test"]["img"]["accuracy"]
    base_txt = summary(runs / "baselines" / "1")["best"]["test"]["txt"]["accuracy"]
    for row, job in zip(rows, ("0", "1")):
        multi = summary(runs / "multirun" / "sweep" / job)["best"]["test"]
        expected = ((multi["img"]["accuracy"] - base_img) / base_img
                    + (multi["txt"]["accuracy"] - base_txt) / base_txt) / 2
        assert row["Δm %"] == pytest.approx(100 * expected)
    assert [row["run"] for row in rows] == ["loss=static", "loss=uncertainty"]
    table = script("delta_m.py", "--baselines", runs / "baselines", "--runs", runs / "multirun").stdout.splitlines()
    assert table[0] == "| run | tasks | Δm % | folder |"
    assert table[2].startswith(f"| loss=static | img txt | {rows[0]['Δm %']:+.2f} |")


def test_errors_are_one_line_and_exit_2(runs, tmp_path):
    def fails(name, *args, match):
        result = script(name, *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and match in result.stderr, result.stderr

    (tmp_path / "empty").mkdir()
    fails("sweep_table.py", tmp_path / "empty", match=f"no runs under {tmp_path / 'empty'}")
    fails("sweep_table.py", tmp_path / "nowhere", match="is not a folder")
    fails("sweep_table.py", runs / "multirun", "--baseline", "loss=famo", match="--baseline loss=famo")
    broken = tmp_path / "broken" / "0"
    light = shutil.ignore_patterns("checkpoints", "tokenizer")
    shutil.copytree(runs / "multirun" / "sweep" / "0", broken, ignore=light)
    (broken / "summary.json").write_text("{not json")
    fails("sweep_table.py", broken.parent, match=f"cannot read {broken / 'summary.json'}")

    fails("delta_m.py", "--baselines", runs / "baselines" / "0", "--runs", runs / "multirun",
          match="task 'txt' has no single-task baseline")
    twice = tmp_path / "twice"
    shutil.copytree(runs / "baselines" / "0", twice, ignore=light)
    fails("delta_m.py", "--baselines", runs / "baselines", twice, "--runs", runs / "multirun",
          match="two baselines train task 'img'")
    fails("delta_m.py", "--baselines", runs / "multirun", "--runs", runs / "multirun", match="trains 2 tasks")
    fails("delta_m.py", "--baselines", runs / "baselines", "--runs", runs / "baselines", match="no multi-task run")
