"""Shared fixtures: configs composed exactly as mtmm-train composes them, on a tiny shapes dataset."""

import os
import tempfile

import pytest
from hydra import compose, initialize_config_module

# Everything a test run generates or caches (datasets, frozen-encoder features) goes to a throw-away folder, never
# into the user's ~/.cache/mtmm; subprocesses inherit it.
os.environ["MTMM_CACHE"] = tempfile.mkdtemp(prefix="mtmm-tests-")

TINY = ["data.source.train=96", "data.source.val=32", "data.source.test=32", "data.batch_size=32",
        "data.eval_batch_size=64", "trainer.epochs=2", "trainer.log_every=1", "trainer.progress=false",
        "device=cpu", "data.num_workers=0"]
# In-process runs load in the test process (forked workers would only add start-up time to every run); the
# subprocess tests of the installed commands run the default, `auto` (a worker where images are decoded).


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory):
    """One generated dataset cache for the whole session: generation is deterministic, so sharing it is safe."""
    return tmp_path_factory.mktemp("shapes-cache")


@pytest.fixture
def make_cfg(shapes_cache):
    """make_cfg(*overrides) -> the composed training config on the tiny dataset."""

    def make(*overrides: str):
        with initialize_config_module("mtmm.conf", version_base="1.3"):
            return compose("train", overrides=[f"data.source.cache_dir={shapes_cache}", *TINY, *overrides])

    return make


def train_tiny(folder, *overrides: str):
    """Train a tiny model in-process into folder/run (data generated under folder/data); returns its best.pt."""
    from mtmm.train import train
    with initialize_config_module("mtmm.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"data.source.cache_dir={folder / 'data'}", *TINY, *overrides])
    train(cfg, run_dir=folder / "run")
    return folder / "run" / "checkpoints" / "best.pt"


def assert_processes_agree(one, two, task: str) -> None:
    """The metrics.jsonl of a 1-process and a 2-process run of the same global batch: the same records, each train
    loss and each evaluation's `task` loss within float tolerance, the same labelled counts."""
    import json
    import math
    read = lambda folder: [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    first, second = read(one), read(two)
    assert [r["split"] for r in first] == [r["split"] for r in second]
    for a, b in zip(first, second):
        if a["split"] == "train":
            assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)
        else:
            assert math.isclose(a[task]["loss"], b[task]["loss"], rel_tol=1e-4), (a, b)
            assert a[task]["count"] == b[task]["count"], (a, b)
