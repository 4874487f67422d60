"""DataLoader worker processes: how many (`data.num_workers`, `auto` by default), and how they start."""

import multiprocessing
import os

import torch
from torch.utils.data import DataLoader

from mtmm.data.collate import finish_batch
from mtmm.errors import UserError

MAX_AUTO_WORKERS = 8


def loader_workers(setting, loads_images: bool, device: torch.device | None) -> int:
    """`data.num_workers` as a number. `auto`: when the model runs on an accelerator (CUDA, MPS) and batches carry
    images (decoded, or their rows read from the image cache and pinned: megabytes per batch at 224 px), one worker
    per two of this process's cores, at most 8, so that this host work overlaps the step instead of delaying the
    next kernel launch. Otherwise none: texts are tokenised once and cached features are sliced, and on a CPU-only
    run the step already uses every core, so a worker only takes cores from it (measured on 2 cores, decoding per
    step: the epoch up to 15% slower; README benchmark (c))."""
    if setting == "auto":
        if not loads_images or device is None or device.type == "cpu":
            return 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # set by torchrun / elastic_launch per node
        return max(1, min(MAX_AUTO_WORKERS, cores // (2 * processes)))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise UserError(f"data.num_workers={setting!r}; use a whole number >= 0 (0 = load in the training process) "
                        f"or auto")
    return setting


def worker_options(workers: int) -> dict:
    """DataLoader keyword arguments for `workers` worker processes. The start method is named explicitly, the
    platform's default (fork on Linux, spawn on macOS and Windows): inside a job of Hydra's joblib launcher the
    process-wide default is loky's, which cannot start a DataLoader worker."""
    if workers == 0:
        return {"num_workers": 0}
    platform_default = multiprocessing.get_all_start_methods()[0]
    return {"num_workers": workers, "multiprocessing_context": multiprocessing.get_context(platform_default)}


def file_order_loader(dataset, batch_size: int, workers: int) -> DataLoader:
    """The split in file order, batched as training batches it (what the caches are built from). Its own generator:
    a loader without one draws its seed from the global RNG, which would shift dropout, and the run that made a
    cache would then differ from the runs that reuse it."""
    return DataLoader(dataset, batch_size=batch_size, collate_fn=finish_batch, generator=torch.Generator(),
                      **worker_options(workers))
