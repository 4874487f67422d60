"""Gradient-based loss weighting under DDP: 2 gloo processes on CPU, each on its share of the global batch, give the
task weights, losses and parameters of 1 process on the whole batch, for every method.

The comparison drives the loop's own train_step (no_sync, collect/add_partials/apply, GradNorm's averaging, the
optimizer) with a tiny model that has the MultiTaskModel's layout (encoder -> `fused` -> shared -> heads), one spawn
of 2 processes for every method and case (what this module imports at the top is kept light: the spawned processes
import it). One end-to-end `train()` with device.nproc_per_node=2 checks the wiring (torchelastic, DDP, the
sampler's split, metrics.jsonl) for pcgrad.
"""

import json
import math
import os
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from torch import nn

from mtmm.build import instantiate
from mtmm.distributed import Rank, mean_across_ranks
from mtmm.loop import Progress, train_step
from mtmm.tasks import TaskSpec
from mtmm.weighting.gradient import METHODS as GRADIENT_METHODS

WORLD, STEPS, PER_RANK = 2, 3, 4  # samples per rank and micro-batch
TASKS = [TaskSpec("a", "multiclass", "a", classes=("x", "y", "z")), TaskSpec("b", "binary", "b", classes=("n", "y")),
         TaskSpec("c", "regression", "c")]
LAMBDAS = {"a": 1.0, "b": 0.5, "c": 2.0}  # not all 1: lambda_k must scale each task's share the same way in both
# (name, loss.on, trainer.grad_accum_steps). GradDrop's draws are per column of the gradient matrix: on the
# representation the columns are samples, which this test orders alike (rank 0's, then rank 1's) in both runs.
CASES = [("parameters", "parameters", 1), ("representation", "representation", 1), ("accumulated", "parameters", 2)]
# GradNorm averages its gradients itself; static is DDP's plain path, for reference; Uncertainty's log-variances are
# the weighting's own parameters, outside the DDP module (train_step averages their gradients); FAMO's logits follow
# the losses averaged over processes; RLW draws from the same seeded generator on every process.
OTHERS = ["gradnorm", "static", "uncertainty", "famo", "rlw", "dwa"]


def loss_configs() -> dict[str, dict]:
    """Every method's conf/loss/<name>.yaml, as mtmm-train composes it."""
    from hydra import compose, initialize_config_module
    configs = {}
    with initialize_config_module("mtmm.conf", version_base="1.3"):
        for method in [*GRADIENT_METHODS, *OTHERS]:
            configs[method] = OmegaConf.to_container(compose("train", overrides=[f"loss={method}"]).loss)
    return configs


def runs(configs: dict[str, dict]) -> list[tuple[str, str, dict, int]]:
    """(case, method, loss config, grad_accum_steps) of every comparison."""
    out = []
    for case, on, accumulate in CASES:
        for method in GRADIENT_METHODS:
            if method == "db_mtl" and on == "representation":  # refused: it averages over steps
                continue
            out.append((case, method, {**configs[method], "on": on}, accumulate))
    out += [("loss-based", method, configs[method], 1) for method in OTHERS]
    return out


class Tiny(nn.Module):
    """MultiTaskModel's layout in miniature: encoders -> fused -> shared. -> heads.; `missing` is never used (as
    the missing-modality embeddings of a complete batch), so its .grad must stay None in both runs."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(5, 6)
        self.missing = nn.Parameter(torch.ones(3))
        self.shared = nn.Linear(6, 6)
        self.heads = nn.ModuleDict({"a": nn.Linear(6, 3), "b": nn.Linear(6, 1), "c": nn.Linear(6, 1)})

    def forward(self, batch):
        self.fused = torch.tanh(self.encoder(batch["x"]))
        h = torch.relu(self.shared(self.fused))
        return {task: head(h) for task, head in self.heads.items()}

    def last_shared_parameters(self):
        return list(self.shared.parameters())


def global_batches(accumulate: int) -> list[list[list[dict]]]:
    """[step][micro-batch][rank] -> that rank's samples; the same numbers in every process."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        step = []
        for _ in range(accumulate):
            ranks = []
            for _ in range(WORLD):
                n = PER_RANK
                ranks.append({"x": torch.randn(n, 5, generator=generator),
                              "targets": {"a": torch.randint(3, (n,), generator=generator),
                                          "b": torch.randint(2, (n,), generator=generator).float(),
                                          "c": torch.randn(n, generator=generator)},
                              "target_mask": {t: torch.ones(n, dtype=torch.bool) for t in LAMBDAS},
                              "index": torch.arange(n)})
            step.append(ranks)
        out.append(step)
    return out


def joined(parts: list[dict]) -> dict:
    """The micro-batch one process sees: every rank's share, in rank order."""
    if isinstance(parts[0], dict):
        return {key: joined([p[key] for p in parts]) for key in parts[0]}
    return torch.cat(parts)


def train_steps(loss_cfg: dict, accumulate: int, rank: Rank) -> dict:
    """STEPS optimizer steps of loop.train_step; per step the logged losses (mean over ranks) and task weights."""
    torch.manual_seed(0)  # the run's seed, set in every process before the model and the weighting are built
    model = Tiny()
    weighting = instantiate(OmegaConf.create(loss_cfg), task_weights=LAMBDAS)
    forward = model
    if rank.world_size > 1:  # as run.setup wraps it
        forward = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    # SGD, not Adam: an update twice too large would be normalised away by Adam. Weight decay: a parameter that
    # should have .grad None (skipped) but got zeros would decay.
    optimizer = torch.optim.SGD([*model.parameters(), *weighting.parameters()], lr=0.2, weight_decay=0.1)
    cfg = OmegaConf.create({"trainer": {"grad_accum_steps": accumulate, "grad_clip": None, "on_nonfinite": "error",
                                        "log_conflict_every": 0}, "device": {"precision": "fp32"}})
    run = SimpleNamespace(cfg=cfg, model=model, forward=forward, weighting=weighting, optimizer=optimizer,
                          scaler=torch.amp.GradScaler("cpu", enabled=False),
                          scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                          data=SimpleNamespace(tasks=TASKS), device=torch.device("cpu"), rank=rank, ema=None)
    model.train()
    weighting.train()
    progress, record = Progress(), {"losses": [], "weights": []}
    for step in global_batches(accumulate):
        group = [joined(ranks) if rank.world_size == 1 else ranks[rank.rank] for ranks in step]
        total, losses, _ = train_step(run, group, progress)
        record["losses"].append(mean_across_ranks({"total": total.item(), **{t: l.item() for t, l in losses.items()}},
                                                  rank))
        record["weights"].append(weighting.weights())
    record["parameters"] = {name: p.detach().clone() for name, p in model.named_parameters()}
    record["unreached"] = sorted(name for name, p in model.named_parameters() if p.grad is None)
    return record


def all_runs(configs: dict, rank: Rank) -> dict:
    return {(case, method): train_steps(loss_cfg, accumulate, rank)
            for case, method, loss_cfg, accumulate in runs(configs)}


def worker(rank: int, init: str, configs: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        torch.save(all_runs(configs, Rank(rank, WORLD, rank)), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """(1-process results, [each rank's 2-process results]) of every run."""
    folder = tmp_path_factory.mktemp("ddp")
    configs = loss_configs()
    one = all_runs(configs, Rank())
    mp.spawn(worker, args=(f"file://{folder / 'init'}", configs, str(folder)), nprocs=WORLD)
    two = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return one, two


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)


@pytest.mark.parametrize("case,method", [
    pytest.param(case, method)
    for case, method, _, _ in runs({m: {} for m in [*GRADIENT_METHODS, *OTHERS]})])
def test_two_processes_match_one_on_the_same_global_batch(results, case, method):
    one, two = results
    expected, ranks = one[(case, method)], [r[(case, method)] for r in two]
    for got in ranks:
        for step, (a, b) in enumerate(zip(expected["losses"], got["losses"]), 1):
            assert all(close(a[k], b[k]) for k in a), (step, a, b)
        for step, (a, b) in enumerate(zip(expected["weights"], got["weights"]), 1):
            assert all(close(a[k], b[k]) for k in a), (step, a, b)
        for name, value in expected["parameters"].items():
            assert torch.allclose(got["parameters"][name], value, rtol=1e-4, atol=1e-5), name
        assert got["unreached"] == expected["unreached"] == ["missing"]
    # Every process combined the same matrix into the same update: the ranks agree exactly, not just closely.
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert all(torch.equal(ranks[0]["parameters"][n], ranks[1]["parameters"][n]) for n in expected["parameters"])


@pytest.mark.slow
def test_pcgrad_run_with_two_processes_logs_what_one_process_logs(make_cfg, tmp_path):
    from mtmm.train import train
    # Text only (no BatchNorm) and no dropout: 1 and 2 processes compute the same function of the same samples; the
    # sampler gives rank r the samples r, r+2, ... of each global batch of data.batch_size.
    common = ["tasks=img+txt", "encoder/image=none", "encoder.text.dropout=0", "mtl.dropout=0", "loss=pcgrad",
              "encoder.text.hidden_size=32", "encoder.text.intermediate_size=64", "encoder.text.num_layers=1",
              "trainer.epochs=1"]
    train(make_cfg(*common), run_dir=tmp_path / "one")
    train(make_cfg(*common, "device.nproc_per_node=2"), run_dir=tmp_path / "two")
    one, two = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                for d in ("one", "two")]
    assert [r["split"] for r in one] == [r["split"] for r in two]
    train_records = [(a, b) for a, b in zip(one, two) if a["split"] == "train"]
    assert len(train_records) == 3
    for a, b in train_records:
        assert close(a["loss"], b["loss"]) and all(close(a[t]["loss"], b[t]["loss"]) for t in ("img", "txt")), (a, b)
        assert all(close(a["weights"][t], b["weights"][t]) for t in ("img", "txt")), (a, b)
    for a, b in zip(one, two):
        if a["split"] in ("val", "test"):
            assert all(close(a[t]["loss"], b[t]["loss"]) and a[t]["count"] == b[t]["count"] for t in ("img", "txt"))


def test_a_method_that_does_not_average_over_processes_is_refused_under_ddp_and_mtmm_s_are_not():
    from mtmm.errors import UserError
    from mtmm.weighting.combine import GradientCombination
    from mtmm.weighting.loss_based import GradNorm
    from mtmm.weighting.protocol import check_weighting

    class Own(nn.Module):  # a user's gradient-combining method that knows nothing of torch.distributed
        combines_gradients, needs_shared_parameters = True, False

        def weights(self):
            return {}

        def end_epoch(self):
            pass

    cfg = OmegaConf.create({"loss": {"_target_": "mypkg.Own"}, "device": {"precision": "fp32"},
                            "trainer": {"grad_accum_steps": 1}})
    check_weighting(cfg, Own(), Rank())  # one process: nothing to average
    with pytest.raises(UserError, match=r"averages_across_processes = True.*device.nproc_per_node=1"):
        check_weighting(cfg, Own(), Rank(0, 2, 0))
    for weighting in (GradientCombination(LAMBDAS, "pcgrad", "representation"), GradNorm(LAMBDAS)):
        check_weighting(cfg, weighting, Rank(0, 2, 0))
