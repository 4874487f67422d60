"""What gradient-based loss weighting costs per step under DDP, next to static weighting, measured side by side.

    python scripts/bench_ddp.py --quick          # < 2 minutes on a 2-core CPU
    python scripts/bench_ddp.py --width 512 --steps 20 --methods static pcgrad mgda cagrad nash_mtl pcgrad@representation

Two gloo processes on CPU run mtmm.loop.train_step (the loop's own step: no_sync, collect/apply, DDP's reducer) on
a model with MultiTaskModel's layout (MLP encoder -> fused -> shared MLP -> 3 heads) and the same global batch, for
each method in turn, round after round (so drift in the machine's load hits every method alike); the same steps run
in one process too. Printed per method: seconds per step with 1 and 2 processes (median over rounds, the slower
rank), their ratio to static's, and the floats each process sends per step: static and GradNorm through DDP's
reducer (every trainable parameter), a gradient-combining method through combine.py's all_reduce (K rows of the
shared parameters or, on the representation, the gathered K x B x D rows, plus the heads and the losses).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from torch import nn

from mtmm.distributed import Rank
from mtmm.loop import Progress, train_step
from mtmm.tasks import TaskSpec
from mtmm.weighting.combine import GradientCombination
from mtmm.weighting.loss_based import GradNorm
from mtmm.weighting.static import StaticWeighting

WORLD = 2
TASKS = [TaskSpec("a", "multiclass", "a", classes=tuple("0123456789")), TaskSpec("b", "binary", "b", classes=("n", "y")),
         TaskSpec("c", "regression", "c")]
LAMBDAS = {task.name: 1.0 for task in TASKS}
QUICK = ["static", "gradnorm", "pcgrad", "mgda", "cagrad", "pcgrad@representation", "mgda@representation"]


class Model(nn.Module):
    """encoder (depth x Linear(width)) -> fused -> shared Linear -> one head per task."""

    def __init__(self, inputs: int, width: int, depth: int):
        super().__init__()
        layers = [nn.Linear(inputs, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.encoder = nn.Sequential(*layers)
        self.shared = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        self.heads = nn.ModuleDict({"a": nn.Linear(width, 10), "b": nn.Linear(width, 1), "c": nn.Linear(width, 1)})

    def forward(self, batch):
        self.fused = self.encoder(batch["x"])
        h = self.shared(self.fused)
        return {task: head(h) for task, head in self.heads.items()}

    def last_shared_parameters(self):
        return list(self.shared.parameters())


def weighting_of(name: str) -> nn.Module:
    method, _, on = name.partition("@")
    if method == "static":
        return StaticWeighting(LAMBDAS)
    if method == "gradnorm":
        return GradNorm(LAMBDAS)
    return GradientCombination(LAMBDAS, method, on or "parameters")


def batch_of(args, rank: Rank, step: int) -> dict:
    """This process's share (samples rank, rank + N, ...) of the global batch of `step`."""
    g = torch.Generator().manual_seed(step)
    n = args.batch
    full = {"x": torch.randn(n, args.inputs, generator=g),
            "targets": {"a": torch.randint(10, (n,), generator=g), "b": torch.randint(2, (n,), generator=g).float(),
                        "c": torch.randn(n, generator=g)},
            "target_mask": {t: torch.ones(n, dtype=torch.bool) for t in LAMBDAS}, "index": torch.arange(n)}
    pick = lambda v: {k: pick(x) for k, x in v.items()} if isinstance(v, dict) else v[rank.rank::rank.world_size]  # noqa: E731
    return pick(full)


def make_run(args, name: str, rank: Rank) -> SimpleNamespace:
    torch.manual_seed(0)
    model = Model(args.inputs, args.width, args.depth)
    weighting = weighting_of(name)
    forward = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if rank.world_size > 1 else model
    optimizer = torch.optim.AdamW([*model.parameters(), *weighting.parameters()], lr=1e-3)
    cfg = OmegaConf.create({"trainer": {"grad_accum_steps": 1, "grad_clip": 1.0, "on_nonfinite": "error",
                                        "log_conflict_every": 0}, "device": {"precision": "fp32"}})
    return SimpleNamespace(cfg=cfg, model=model, forward=forward, weighting=weighting, optimizer=optimizer,
                           scaler=torch.amp.GradScaler("cpu", enabled=False),
                           scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                           data=SimpleNamespace(tasks=TASKS), device=torch.device("cpu"), rank=rank,
                           progress=Progress())


def timed_steps(args, run, rank: Rank, first_step: int) -> float:
    """Seconds per step of args.steps steps (the slower process's)."""
    if rank.world_size > 1:
        dist.barrier()
    started = time.perf_counter()
    for step in range(first_step, first_step + args.steps):
        train_step(run, [batch_of(args, rank, step)], run.progress)
    elapsed = torch.tensor([(time.perf_counter() - started) / args.steps], dtype=torch.float64)
    if rank.world_size > 1:
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def sent_per_step(args, run, rank: Rank) -> int:
    """Floats this process sends per step: counted at torch.distributed's Python calls, plus DDP's reducer."""
    counted = {"n": 0}
    originals = dist.all_reduce, dist.all_gather

    def all_reduce(tensor, *a, **k):
        counted["n"] += tensor.numel()
        return originals[0](tensor, *a, **k)

    def all_gather(tensors, tensor, *a, **k):
        counted["n"] += tensor.numel()
        return originals[1](tensors, tensor, *a, **k)

    dist.all_reduce, dist.all_gather = all_reduce, all_gather
    try:
        train_step(run, [batch_of(args, rank, 10_000)], run.progress)
    finally:
        dist.all_reduce, dist.all_gather = originals
    reducer = 0 if run.weighting.combines_gradients else sum(p.numel() for p in run.model.parameters())
    return counted["n"] + reducer


def measure(args, rank: Rank) -> dict:
    """{method: ([seconds per step of each round], floats sent per step)}."""
    runs = {name: make_run(args, name, rank) for name in args.methods}
    for name, run in runs.items():  # warm-up (allocations, first DDP step)
        timed_steps(args, run, rank, 0)
    seconds = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, run in runs.items():
            seconds[name].append(timed_steps(args, run, rank, 1000 * (r + 1)))
    sent = {name: sent_per_step(args, run, rank) if rank.world_size > 1 else 0 for name, run in runs.items()}
    return {name: (seconds[name], sent[name]) for name in runs}


def worker(rank: int, init: str, args, out: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD, timeout=timedelta(minutes=10))
    try:
        result = measure(args, Rank(rank, WORLD, rank))
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer methods, a smaller model, fewer steps")
    parser.add_argument("--methods", nargs="+", help="static, gradnorm, a method of gradient.py, or method@representation")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=3, help="encoder layers")
    parser.add_argument("--inputs", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="global batch (split over the processes)")
    parser.add_argument("--steps", type=int, default=10, help="steps per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="measurements per method, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    if args.quick:
        args.width, args.steps, args.rounds = min(args.width, 256), min(args.steps, 5), min(args.rounds, 3)
    args.methods = args.methods or (QUICK if args.quick else
                                    ["static", "gradnorm", "pcgrad", "cagrad", "mgda", "imtl", "aligned_mtl", "nash_mtl",
                                     "upgrad", "graddrop", "gradvac", "db_mtl", "fairgrad", "pcgrad@representation",
                                     "mgda@representation"])
    if "static" not in args.methods:
        args.methods = ["static", *args.methods]

    torch.set_num_threads(args.threads)
    one = measure(args, Rank())
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "two.pt")
        mp.spawn(worker, args=(f"file://{os.path.join(folder, 'init')}", args, out), nprocs=WORLD)
        two = torch.load(out, weights_only=False)

    parameters = sum(p.numel() for p in Model(args.inputs, args.width, args.depth).parameters())
    print(f"{parameters:,} parameters, global batch {args.batch}, {args.steps} steps x {args.rounds} rounds, "
          f"{args.threads} thread(s) per process, torch {torch.__version__}, {os.cpu_count()} CPUs")
    s1, s2 = (statistics.median(one["static"][0]), statistics.median(two["static"][0]))
    print(f"{'method':<24}{'1 proc s/step':>14}{'x static':>9}{'2 proc s/step':>15}{'x static':>9}"
          f"{'2 / 1 proc':>11}{'floats sent/step':>18}")
    for name in args.methods:
        a, b = statistics.median(one[name][0]), statistics.median(two[name][0])
        print(f"{name:<24}{a:>14.4f}{a / s1:>9.2f}{b:>15.4f}{b / s2:>9.2f}{b / a:>11.2f}{two[name][1]:>18,}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
