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
