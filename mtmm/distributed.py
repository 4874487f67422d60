"""Distributed data parallel through torch.distributed: N processes launched from inside the Hydra job (so Hydra
makes one run folder), gloo on CPU and NCCL on GPU. Rank 0 alone writes; evaluation gathers every rank's share."""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


CACHE_BUILD_TIMEOUT = timedelta(hours=4)
_cache_waits = None  # the process group wait_for_main uses, made by init


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only the main process writes files and logs records."""
        return self.rank == 0


def current_rank() -> Rank:
    if not dist.is_available() or not dist.is_initialized():
        return Rank()
    return Rank(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launch(nproc: int, entrypoint, *args):
    """Run entrypoint(*args) in `nproc` local processes with torchelastic; returns rank 0's result.
    For several nodes use torchrun, which sets the same environment (see the README)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"mtmm-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.5)
    return elastic_launch(config, entrypoint)(*args)[0]


def init(device_type: str) -> Rank:
    """Join the process group that torchelastic/torchrun described in the environment."""
    global _cache_waits
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    # Rank 0 alone builds the image and feature caches while the others wait, which may outlast the collectives'
    # default timeout (10 minutes for NCCL) on a large split; training's collectives keep that default.
    _cache_waits = dist.new_group(backend="gloo", timeout=CACHE_BUILD_TIMEOUT)
    rank = current_rank()
    if device_type == "cuda":
        torch.cuda.set_device(rank.local_rank)
    return rank


def gather(obj, rank: Rank) -> list:
    """Every rank's `obj`, on every rank (evaluation results are small: logits of a split)."""
    if rank.world_size == 1:
        return [obj]
    objects = [None] * rank.world_size
    dist.all_gather_object(objects, obj)
    return objects


def mean_across_ranks(values: dict[str, float], rank: Rank) -> dict[str, float]:
    """The mean over ranks of some logged numbers (each rank saw a different share of the batch)."""
    if rank.world_size == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[key] for key in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return {key: float(value) / rank.world_size for key, value in zip(keys, tensor.tolist())}


def barrier(rank: Rank) -> None:
    if rank.world_size > 1:
        dist.barrier()


def wait_for_main(rank: Rank) -> None:
    """A barrier for the other ranks while the main process builds a cache (timeout CACHE_BUILD_TIMEOUT)."""
    if rank.world_size > 1:
        dist.barrier(group=_cache_waits)


def world_size() -> int:
    """The number of processes of the initialised process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over processes of a tensor (a new one); the tensor itself in a single process."""
    if world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / world_size()


def average_gradients(parameters) -> None:
    """Make .grad of `parameters` the mean over processes, in one all_reduce, as DDP's reducer does for the model's:
    for parameters outside the DDP module (a loss weighting's own, e.g. Uncertainty's log-variances). A parameter
    whose .grad is None on every process keeps None; nothing happens in a single process."""
    parameters = [p for p in parameters if p.requires_grad]
    if world_size() == 1 or not parameters:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flags = torch.tensor([float(p.grad is not None) for p in parameters], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([*(g.reshape(-1) for g in grads), flags])
    dist.all_reduce(flat)
    at = 0
    for p, g, here in zip(parameters, grads, (flat[-len(parameters):] > 0).tolist()):
        p.grad = (flat[at:at + g.numel()].view_as(g) / world_size()).clone() if here else None
        at += g.numel()


def ddp_of(forward):
    """The DistributedDataParallel module that `forward` is or wraps (torch.compile), or None."""
    forward = getattr(forward, "_orig_mod", forward)
    return forward if isinstance(forward, torch.nn.parallel.DistributedDataParallel) else None


def no_sync(forward, skip: bool):
    """DDP's no_sync() (its reducer does not average this backward) when `skip` and `forward` is DDP; else nothing."""
    import contextlib
    ddp = ddp_of(forward)
    return ddp.no_sync() if skip and ddp is not None else contextlib.nullcontext()
