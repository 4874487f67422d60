"""Loss-based task weighting: each method's defining property, then the contract every method shares."""

import copy
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import mtmm.conf
from mtmm.build import build_weighting
from mtmm.weighting.loss_based import DWA, FAMO, METHODS, RLW, GradNorm, Uncertainty

CONF = Path(mtmm.conf.__file__).parent / "loss"


class Toy(nn.Module):
    """A shared layer W and one head per task; task t's loss is scales[t] * (its head's output)^2 + 0.1 (> 0)."""

    def __init__(self, scales: dict[str, float], same_head: bool = False):
        super().__init__()
        self.shared = nn.Linear(4, 8)
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in scales})
        generator = torch.Generator().manual_seed(0)
        # Initialised in sorted task order, so that the same tasks listed in another order give the same toy.
        with torch.no_grad():
            for module in [self.shared, *(self.heads[t] for t in sorted(scales))]:
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            if same_head:  # then the tasks' gradients on W differ only by their scales
                for head in self.heads.values():
                    head.load_state_dict(next(iter(self.heads.values())).state_dict())
        self.scales = scales

    def losses(self, step: int = 0) -> dict[str, torch.Tensor]:
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(step))
        h = torch.tanh(self.shared(x))
        return {t: self.scales[t] * head(h).pow(2).mean() + 0.1 for t, head in self.heads.items()}


def run(method: nn.Module, toy: Toy, steps: range, epoch_every: int = 2) -> list[float]:
    """Training steps as the loop runs them: total -> backward -> step of the method's own parameters (SGD here)."""
    totals = []
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1) if list(method.parameters()) else None
    for step in steps:
        torch.manual_seed(1000 + step)  # RLW draws from the global generator
        total = method(toy.losses(step), shared=list(toy.shared.parameters()))
        total.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
        toy.zero_grad()
        if (step + 1) % epoch_every == 0:
            method.end_epoch()
        totals.append(total.item())
    return totals


# --- Uncertainty -------------------------------------------------------------------------------------------------

def test_uncertainty_log_variance_converges_to_log_loss():
    method = Uncertainty({"a": 1.0, "b": 1.0, "c": 3.0})
    assert dict(method.named_parameters())["log_var"].requires_grad  # trained by the main optimizer
    losses = {"a": torch.tensor(0.5), "b": torch.tensor(2.0), "c": torch.tensor(4.0)}
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    for _ in range(300):
        optimizer.zero_grad()
        method(losses).backward()
        optimizer.step()
    assert method.log_var.detach().tolist() == pytest.approx([math.log(0.5), math.log(2.0), math.log(4.0)], abs=1e-2)
    # weight lambda_k exp(-s_k) -> lambda_k / L_k: the weighted losses end up equal (to lambda_k)
    assert method.weights() == pytest.approx({"a": 2.0, "b": 0.5, "c": 0.75}, abs=1e-2)


def test_uncertainty_weights_and_total():
    method = Uncertainty({"a": 2.0, "b": 1.0})
    with torch.no_grad():
        method.log_var.copy_(torch.tensor([math.log(4.0), -1.0]))
    assert method.weights() == pytest.approx({"a": 0.5, "b": math.e})
    total = method({"a": torch.tensor(3.0), "b": torch.tensor(1.0)})
    assert total.item() == pytest.approx(2.0 * (3.0 / 4.0 + math.log(4.0)) + (math.e - 1.0))


# --- DWA ---------------------------------------------------------------------------------------------------------

def test_dwa_weights_follow_the_loss_ratios_of_the_last_two_epochs():
    method = DWA({"a": 1.0, "b": 1.0, "c": 2.0}, temperature=2.0)
    epochs = [  # per epoch, the steps' losses (a, b, c); means: [1, 1, 1], [0.5, 1, 2], then [0.25, 1.5, 2]
        [(1.0, 0.8, 1.0), (1.0, 1.2, 1.0)],
        [(0.4, 1.0, 2.0), (0.6, 1.0, 0.0), (0.5, 1.0, 2.0)],  # c == 0: no label in that batch, not in the mean
        [(0.25, 1.5, 2.0)],
    ]
    seen = []
    for epoch in epochs:
        for a, b, c in epoch:
            total = method({"a": torch.tensor(a), "b": torch.tensor(b), "c": torch.tensor(c)})
            seen.append((method.weights(), total.item(), a + b + 2 * c))
        method.end_epoch()
    for weights, total, static in seen[:5]:  # the first two epochs: w = 1
        assert weights == {"a": 1.0, "b": 1.0, "c": 2.0} and total == pytest.approx(static)
    # after epoch 2: r = [0.5, 1, 2], w = 3 exp(r/2) / sum exp(r/2), by hand:
    # exp(.25) = 1.284025, exp(.5) = 1.648721, exp(1) = 2.718282, sum 5.651028
    expected = [3 * 1.284025 / 5.651028, 3 * 1.648721 / 5.651028, 3 * 2.718282 / 5.651028]
    assert seen[5][0] == pytest.approx({"a": expected[0], "b": expected[1], "c": 2 * expected[2]}, abs=1e-5)
    assert sum(expected) == pytest.approx(3.0)
    # after epoch 3: r = [0.25 / 0.5, 1.5 / 1, 2 / 2] = [0.5, 1.5, 1]
    r = torch.tensor([0.5, 1.5, 1.0])
    assert method.w.tolist() == pytest.approx((3 * torch.softmax(r / 2, 0)).tolist())
    assert method.w.sum().item() == pytest.approx(3.0)


# --- RLW ---------------------------------------------------------------------------------------------------------

def test_rlw_weights_are_a_fresh_softmax_of_gaussians_every_step():
    def sequence():
        torch.manual_seed(3)
        method, draws = RLW({"a": 1.0, "b": 1.0, "c": 1.0}), []
        for _ in range(4):
            losses = {"a": torch.tensor(1.0), "b": torch.tensor(2.0), "c": torch.tensor(3.0)}
            total = method(losses)
            weights = method.weights()
            assert total.item() == pytest.approx(weights["a"] + 2 * weights["b"] + 3 * weights["c"])
            draws.append(weights)
        return draws

    draws = sequence()
    assert all(sum(w.values()) == pytest.approx(1.0) and min(w.values()) > 0 for w in draws)
    assert draws[0] != draws[1] != draws[2]
    assert sequence() == draws  # same seed -> same weights
    torch.manual_seed(3)
    assert draws[0] == pytest.approx(dict(zip("abc", torch.softmax(torch.randn(3), 0).tolist())))


# --- FAMO --------------------------------------------------------------------------------------------------------

def test_famo_moves_weight_to_the_task_whose_loss_stops_decreasing():
    method = FAMO({"fast": 1.0, "stuck": 1.0})
    assert list(method.parameters()) == []  # the main optimizer never sees the logits
    assert not method.logits.requires_grad
    for step in range(30):
        method({"fast": torch.tensor(0.8 ** step), "stuck": torch.tensor(1.0)})
        weights = method.weights()
        assert sum(weights.values()) == pytest.approx(1.0)
    assert weights["stuck"] > 0.6 > 0.4 > weights["fast"]


def test_famo_matches_the_official_update_and_gradient():
    sequence = torch.rand(8, 3) + 0.05
    method = FAMO({"a": 1.0, "b": 1.0, "c": 1.0}, w_lr=0.025, gamma=0.001)
    for losses in sequence:
        method(dict(zip("abc", losses)))
    # the official FAMO.update, with "after" = the next step's losses
    w = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=0.025, weight_decay=0.001)
    for before, after in zip(sequence[:-1], sequence[1:]):
        delta = (before + 1e-8).log() - (after + 1e-8).log()
        optimizer.zero_grad()
        w.grad = torch.autograd.grad(F.softmax(w, -1), w, grad_outputs=delta)[0]
        optimizer.step()
    assert method.logits.tolist() == pytest.approx(w.tolist(), abs=1e-6)
    # our total has the gradient of the official get_weighted_loss (with the same logits: eval mode, no update)
    method.eval()
    losses = (torch.rand(3) + 0.05).requires_grad_()
    method(dict(zip("abc", losses))).backward()
    ours = losses.grad.clone()
    losses.grad = None
    z = F.softmax(w.detach(), -1)
    d = losses - 0 + 1e-8
    c = (z / d).sum().detach()
    (d.log() * z / c).sum().backward()
    assert ours.tolist() == pytest.approx(losses.grad.tolist(), rel=1e-5)
    assert ours.sum().item() == pytest.approx(1.0)


# --- GradNorm ----------------------------------------------------------------------------------------------------

def test_gradnorm_lowers_the_weight_of_the_task_with_the_larger_gradient():
    toy = Toy({"small": 1.0, "large": 10.0}, same_head=True)  # same losses ratio L/L0, 10x the gradient on W
    method = GradNorm({"small": 1.0, "large": 1.0}, alpha=1.5, lr=0.025)
    history = []
    for _ in range(150):
        method(toy.losses(0), shared=list(toy.shared.parameters()))
        history.append(method.weights())
        assert sum(history[-1].values()) == pytest.approx(2.0)
    assert history[0]["large"] < 1.0 < history[0]["small"]
    assert history[10]["large"] < history[0]["large"]
    # balanced gradient norms: w_small * 1 == w_large * 10 -> w_large = 2/11
    assert history[-1]["large"] == pytest.approx(2 / 11, abs=0.05)


def test_gradnorm_needs_the_shared_parameters():
    method = GradNorm({"a": 1.0, "b": 1.0})
    losses = {"a": torch.tensor(1.0, requires_grad=True), "b": torch.tensor(2.0, requires_grad=True)}
    with pytest.raises(ValueError, match="GradNorm needs the parameters of the last shared layer"):
        method(losses)
    method.eval()
    assert method(losses).item() == pytest.approx(3.0)  # evaluation computes no gradient: shared is not needed


# --- the contract of every method -------------------------------------------------------------------------------

TASKS = {"a": 1.0, "b": 2.0, "c": 0.5}
SCALES = {"a": 1.0, "b": 3.0, "c": 0.3}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_single_task_is_plain_lambda_times_its_loss(name):
    toy = Toy({"t": 1.0})
    method = METHODS[name]({"t": 2.5})
    shared = list(toy.shared.parameters())
    for step in range(3):
        losses = toy.losses(step)
        total = method(losses, shared=shared)
        assert total.item() == pytest.approx(2.5 * losses["t"].item(), rel=1e-6)
        ours = torch.autograd.grad(total, list(toy.parameters()), retain_graph=True)
        plain = torch.autograd.grad(2.5 * losses["t"], list(toy.parameters()))
        for g, p in zip(ours, plain):
            assert torch.allclose(g, p, rtol=1e-5, atol=1e-7)
        method.end_epoch()
        assert method.weights() == pytest.approx({"t": 2.5})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_permuting_the_tasks_permutes_the_weights(name):
    first = METHODS[name](TASKS)
    second = METHODS[name]({t: TASKS[t] for t in ["c", "a", "b"]})
    scales = {t: SCALES[t] for t in ["b", "c", "a"]}
    assert run(first, Toy(SCALES), range(7)) == pytest.approx(run(second, Toy(scales), range(7)))
    assert first.weights() == pytest.approx(second.weights())
    assert len(set(first.weights().values())) == 3  # the weights did move away from their start


@pytest.mark.parametrize("name", sorted(METHODS))
def test_eval_mode_changes_no_state(name):
    method, toy = METHODS[name](TASKS), Toy(SCALES)
    run(method, toy, range(5))
    before, weights, rng = copy.deepcopy(method.state_dict()), method.weights(), torch.get_rng_state()
    method.eval()
    for step in range(3):
        with torch.no_grad():
            method(toy.losses(10 + step))
    assert torch.equal(torch.get_rng_state(), rng)
    assert method.weights() == weights
    after = method.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_state_dict_round_trip_resumes_the_same_weights(name):
    method = METHODS[name](TASKS)
    run(method, Toy(SCALES), range(5))
    state = method.state_dict()
    assert state and all(isinstance(value, torch.Tensor) for value in state.values())
    buffer = io.BytesIO()
    torch.save(state, buffer)  # the checkpoint's contract: loadable with weights_only=True
    buffer.seek(0)
    resumed = METHODS[name](TASKS)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.weights() == pytest.approx(method.weights())
    assert run(resumed, Toy(SCALES), range(5, 8)) == pytest.approx(run(method, Toy(SCALES), range(5, 8)))
    assert resumed.weights() == pytest.approx(method.weights())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_instantiates_from_its_config(name, make_cfg):
    method = instantiate(OmegaConf.load(CONF / f"{name}.yaml"), task_weights={"a": 1.0, "b": 2.0})
    assert isinstance(method, METHODS[name])
    assert set(method.weights()) == {"a", "b"}
    cfg = make_cfg(f"loss={name}")  # as mtmm-train composes it, task weights from tasks.<k>.weight
    assert isinstance(build_weighting(cfg), METHODS[name])


@pytest.mark.parametrize("overrides, message", [
    (["loss=dwa", "loss.temperature=0"], r"loss.temperature=0 for loss=dwa; use a number > 0"),
    (["loss=famo", "loss.w_lr=-1"], r"loss.w_lr=-1 for loss=famo"),
    (["loss=gradnorm", "loss.alpha=-0.5"], r"loss.alpha=-0.5 for loss=gradnorm"),
    (["loss=dwa", "+loss.temp=3"], r"loss.temp is not an option of loss=.*DWA; it takes \['temperature'\]"),
    (["loss=cagrad", "+loss.options.cc=1"], r"loss.options.cc is not an option of loss=cagrad; it takes \['c', 'rescale'\]"),
])
def test_bad_loss_options_are_refused_at_start_up_naming_what_is_accepted(overrides, message):
    from hydra import compose, initialize_config_module
    from mtmm.errors import UserError
    with initialize_config_module("mtmm.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with pytest.raises(UserError, match=message):
        build_weighting(cfg)


def test_every_weighting_declares_the_protocol_flags():
    from mtmm.weighting.static import StaticWeighting
    for method in [StaticWeighting, *METHODS.values()]:
        assert isinstance(method.combines_gradients, bool) and isinstance(method.needs_shared_parameters, bool)
    assert GradNorm.needs_shared_parameters and not Uncertainty.needs_shared_parameters
