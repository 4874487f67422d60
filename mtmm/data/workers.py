"""DataLoader worker processes: how many (`data.num_workers`, `auto` by default), and how they meet a stop signal."""

import multiprocessing
import os
import signal

from mtmm.errors import UserError

MAX_AUTO_WORKERS = 8


def loader_workers(setting, decodes_images: bool) -> int:
    """`data.num_workers` as a number. `auto`: decoding images is the one per-sample cost of the data path (texts
    are tokenised once, cached features are sliced), so with images to decode every training process gets one
    worker per two of its cores (at most 8), which overlaps decoding with the step; without, none (a worker would
    only add start-up time and inter-process copies)."""
    if setting == "auto":
        if not decodes_images:
            return 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # set by torchrun / elastic_launch per node
        return max(1, min(MAX_AUTO_WORKERS, cores // (2 * processes)))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise UserError(f"data.num_workers={setting!r}; use a whole number >= 0 (0 = load in the training process) "
                        f"or auto")
    return setting


def ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: a worker leaves SIGINT and SIGTERM (Ctrl-C, or a scheduler's preemption signal sent to every
    process of the job) to the training process, which finishes its step, saves and then shuts the workers down.
    A worker killed by the signal first would fail that step with "DataLoader worker exited unexpectedly"."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def worker_options(workers: int) -> dict:
    """DataLoader keyword arguments for `workers` worker processes. The start method is named explicitly, the
    platform's default (fork on Linux, spawn on macOS and Windows): inside a job of Hydra's joblib launcher the
    process-wide default is loky's, which cannot start a DataLoader worker."""
    if workers == 0:
        return {"num_workers": 0}
    return {"num_workers": workers, "worker_init_fn": ignore_stop_signals,
            "multiprocessing_context": multiprocessing.get_context(multiprocessing.get_all_start_methods()[0])}
