"""data.num_workers: `auto` resolves from the device, the cores and whether batches carry images; bad values
are refused by name; workers start the platform's way."""

import os

import pytest

from mtmm.data.build import build_data, build_loader
import torch

from mtmm.data.workers import MAX_AUTO_WORKERS, loader_workers, worker_options
from mtmm.errors import UserError
from mtmm.cache.images import attach_image_caches

GPU, CPU = torch.device("cuda"), torch.device("cpu")  # only their type is read: nothing runs on them


@pytest.fixture
def cores(monkeypatch):
    """Pretend the process may run on `n` cores."""
    def set_cores(n: int):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
    return set_cores


@pytest.mark.parametrize("n, expected", [(1, 1), (2, 1), (4, 2), (16, 8), (64, MAX_AUTO_WORKERS)])
def test_auto_on_an_accelerator_gives_one_worker_per_two_cores_when_batches_carry_images(cores, n, expected):
    cores(n)
    assert loader_workers("auto", loads_images=True, device=GPU) == expected


def test_auto_gives_no_worker_on_cpu_or_without_images(cores):
    cores(16)
    assert loader_workers("auto", loads_images=True, device=CPU) == 0
    assert loader_workers("auto", loads_images=True, device=None) == 0  # no device given: as on CPU
    assert loader_workers("auto", loads_images=False, device=GPU) == 0


def test_auto_shares_the_cores_between_the_processes_of_a_node(cores, monkeypatch):
    cores(16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_workers("auto", loads_images=True, device=GPU) == 2


def test_a_number_is_used_as_given():
    assert loader_workers(0, loads_images=True, device=GPU) == 0
    assert loader_workers(3, loads_images=False, device=CPU) == 3


@pytest.mark.parametrize("bad", ["two", -1, 1.5, True])
def test_bad_values_are_refused_with_what_is_accepted(bad):
    with pytest.raises(UserError, match=r"data.num_workers=.*whole number >= 0.*auto"):
        loader_workers(bad, loads_images=True, device=GPU)


def test_loaders_get_workers_only_where_batches_carry_images(make_cfg, cores):
    cores(4)
    with_images = make_cfg("data.num_workers=auto", "tasks=img+txt")
    data = build_data(with_images)
    loader = build_loader(with_images, data, "train", device=GPU)
    assert loader.num_workers == 2 and loader.persistent_workers
    assert build_loader(with_images, data, "train", device=CPU).num_workers == 0
    attach_image_caches(with_images, data, ["train"], CPU)  # rows read from the image cache: images still to move
    assert data.datasets["train"].image_store is not None
    assert build_loader(with_images, data, "train", device=GPU).num_workers == 2
    # The image encoder's outputs come from the feature cache: nothing left to decode.
    cached = {"image": {"pooled": None, "tokens": None, "mask": None}}
    assert build_loader(with_images, data, "train", device=GPU, cached=cached).num_workers == 0
    text_only = make_cfg("data.num_workers=auto", "tasks=txt", "encoder/image=none")
    assert build_loader(text_only, build_data(text_only), "val", device=GPU).num_workers == 0


def test_loading_with_a_worker_gives_the_same_batches(make_cfg):
    cfg = make_cfg("tasks=img+txt")
    data = build_data(cfg)
    in_process = list(build_loader(cfg, data, "train", seed=3))
    cfg.data.num_workers = 1
    with_worker = list(build_loader(cfg, data, "train", seed=3))
    assert len(in_process) == len(with_worker)
    for a, b in zip(in_process, with_worker):
        assert a["index"].tolist() == b["index"].tolist()
        assert (a["image"] == b["image"]).all() and (a["text"]["input_ids"] == b["text"]["input_ids"]).all()


def test_workers_start_the_platform_way_whatever_a_launcher_set(monkeypatch):
    """Hydra's joblib launcher runs jobs in loky processes whose default start method cannot start a worker."""
    import multiprocessing

    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: ("context", method))
    options = worker_options(2)
    assert options["multiprocessing_context"] == ("context", multiprocessing.get_all_start_methods()[0])
    assert options["num_workers"] == 2 and worker_options(0) == {"num_workers": 0}
