"""When tasks fight over the shared layers: every trainer.log_conflict_every steps, each task's gradient norm and the
cosine similarity of every pair of tasks' gradients, on the shared parameters (encoders, fusion, shared layers) or on
the fused representation (trainer.conflict_on). Two tasks conflict at a step when their cosine is below 0: a step
along one's gradient then increases the other's loss. The running tallies live in Progress, so a resumed run
continues them exactly."""

import itertools
import math

import torch
from torch import Tensor, nn


def shared_points(model: nn.Module, on: str) -> list[Tensor]:
    """What the per-task gradients are taken on: every trainable parameter but the heads', or the fused h [B, D]."""
    if on == "representation":
        return [model.fused]
    return [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("heads.")]


def measure(losses: dict[str, Tensor], model: nn.Module, on: str = "parameters") -> dict:
    """{"norms": {task: |g_task|}, "cosine": {"a~b": cos(g_a, g_b)}} of this step's losses (the graph is kept for the
    step's own backward). A task with no label in the batch (loss exactly 0, no gradient) is left out."""
    points = shared_points(model, on)
    grads = {}
    for task, loss in losses.items():
        if not loss.requires_grad or float(loss.detach()) == 0.0:
            continue
        parts = torch.autograd.grad(loss, points, retain_graph=True, allow_unused=True)
        grads[task] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                                 for g, p in zip(parts, points)])
    norms = {task: float(g.norm()) for task, g in grads.items()}
    cosine = {}
    for a, b in itertools.combinations(grads, 2):
        scale = norms[a] * norms[b]
        cosine[f"{a}~{b}"] = float(grads[a] @ grads[b]) / scale if scale > 0 else 0.0
    return {"norms": norms, "cosine": cosine}


def tally(totals: dict, measured: dict) -> None:
    """Add one logged step to the per-pair totals: steps, conflicting steps, the sum of norm ratios (larger over
    smaller) and of cosines."""
    for pair, cosine in measured["cosine"].items():
        a, b = pair.split("~")
        low, high = sorted((measured["norms"][a], measured["norms"][b]))
        entry = totals.setdefault(pair, {"steps": 0, "conflicting": 0, "ratio_sum": 0.0, "cosine_sum": 0.0})
        entry["steps"] += 1
        entry["conflicting"] += int(cosine < 0)
        entry["ratio_sum"] += high / low if low > 0 else math.inf
        entry["cosine_sum"] += cosine


def summarise(totals: dict) -> dict:
    """For summary.json: per pair, the share of logged steps where it conflicts, the mean cosine and norm ratio."""
    return {pair: {"logged_steps": t["steps"], "conflict_share": t["conflicting"] / t["steps"],
                   "mean_cosine": t["cosine_sum"] / t["steps"], "mean_norm_ratio": t["ratio_sum"] / t["steps"]}
            for pair, t in totals.items() if t["steps"]}


def describe(summary: dict) -> list[str]:
    """The summary in plain words, one line per pair, the most conflicting first."""
    lines = []
    for pair, s in sorted(summary.items(), key=lambda item: -item[1]["conflict_share"]):
        a, b = pair.split("~")
        if s["conflict_share"] >= 0.5:
            verdict = f"{a} and {b} fight over the shared layers"
        elif s["conflict_share"] > 0.1:
            verdict = f"{a} and {b} sometimes pull the shared layers apart"
        else:
            verdict = f"{a} and {b} agree"
        lines.append(f"{verdict}: their gradients conflict in {s['conflict_share']:.0%} of {s['logged_steps']} logged "
                     f"steps (mean cosine {s['mean_cosine']:+.2f}); one's gradient is {s['mean_norm_ratio']:.1f}x the "
                     f"other's on average")
    return lines
