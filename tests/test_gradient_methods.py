"""Gradient-combining methods: the worked two-task example every paper uses, the property each method promises, and
GradientCombination's handling of unlabelled tasks and of the stateful methods' state. (The solvers on ill-conditioned
inputs: test_gradient_solvers.py.)"""

import pytest
import torch
from torch import nn

from mtmm.errors import UserError
from mtmm.weighting.combine import GradientCombination
from mtmm.weighting.gradient import METHODS, aligned_mtl, cagrad, db_mtl, imtl, mgda, nash_mtl, pcgrad

# Two conflicting tasks (g1 . g2 = -22), the example of the CAGrad / MGDA comparisons.
J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
LOSSES = torch.ones(2)


def random_grads(k: int = 4, p: int = 50, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def task_losses(grads: torch.Tensor) -> torch.Tensor:
    """Losses for methods that ignore them (all but MGDA's loss normalizations)."""
    return torch.ones(len(grads), dtype=grads.dtype)


# Reference values on J.

def test_mgda_reference():
    update, weights = mgda(J, LOSSES)
    torch.testing.assert_close(weights, torch.tensor([0.6, 0.4]))
    torch.testing.assert_close(update, torch.tensor([0.0, 1.0, 1.0]))


def test_pcgrad_reference():
    update, weights = pcgrad(J, LOSSES)
    torch.testing.assert_close(update, torch.tensor([0.5848, 3.8012, 3.8012]), atol=1e-4, rtol=0)
    # g1 + 22/38 g2 plus g2 + 22/18 g1: the coefficients over the original rows, exactly.
    torch.testing.assert_close(weights, torch.tensor([1 + 22 / 18, 1 + 22 / 38]))


def test_imtl_reference_and_equal_projections():
    update, weights = imtl(J, LOSSES)
    torch.testing.assert_close(weights, torch.tensor([0.5923, 0.4077]), atol=1e-4, rtol=0)
    grads = random_grads()
    update, weights = imtl(grads, task_losses(grads))
    projections = grads @ update / grads.norm(dim=1)  # IMTL-G's defining property: update . u_k equal for all k
    torch.testing.assert_close(projections, projections[:1].expand(4))
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_cagrad_reference_uses_the_mean_gradient():
    # Reproduced with g0 = mean over tasks (the authors' code, LibMTL); g0 = sum would give a different point.
    update, weights = cagrad(J, LOSSES, c=0.5, rescale=0)
    torch.testing.assert_close(update, torch.tensor([0.1835, 1.2041, 1.2041]), atol=1e-4, rtol=0)
    for rescale, divisor in [(1, 1 + 0.5**2), (2, 1 + 0.5)]:
        torch.testing.assert_close(cagrad(J, LOSSES, c=0.5, rescale=rescale)[0], update / divisor)


# What each method promises, on random conflicting gradients.

def test_cagrad_helps_the_worst_task_most_within_its_ball():
    grads = random_grads()
    update, _ = cagrad(grads, task_losses(grads), c=0.5, rescale=0)
    g0 = grads.mean(0)
    radius = 0.5 * g0.norm()
    assert (update - g0).norm() <= radius * (1 + 1e-9)
    # No point of the ball (its boundary, where the optimum lies) does better for the worst task.
    directions = torch.randn(2000, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    candidates = g0 + radius * directions / directions.norm(dim=1, keepdim=True)
    assert (grads @ update).min() >= (candidates @ grads.T).min(dim=1).values.max() - 1e-9


@pytest.mark.parametrize("k", [2, 4])
def test_mgda_update_is_the_min_norm_point(k):
    grads = random_grads(k)
    update, weights = mgda(grads, task_losses(grads))
    # KKT of min ||w G|| over the simplex: g_k . d >= ||d||^2 for every task (a descent direction for all),
    # with equality on the tasks that carry weight.
    gains, norm2 = grads @ update, update @ update
    assert (gains >= norm2 * (1 - 1e-7)).all()
    torch.testing.assert_close(gains[weights > 1e-6], norm2.expand(int((weights > 1e-6).sum())), rtol=1e-7, atol=0)
    assert (weights >= 0).all() and torch.isclose(weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_mgda_normalizations_keep_the_descent_guarantee():
    grads = random_grads() * torch.tensor([[1.0], [10.0], [0.1], [3.0]], dtype=torch.float64)
    losses = torch.tensor([0.5, 2.0, 1.0, 4.0], dtype=torch.float64)
    for normalization in ["l2", "loss", "loss+"]:
        update, weights = mgda(grads, losses, normalization=normalization)
        assert (grads @ update >= -1e-9).all(), normalization
        torch.testing.assert_close(weights @ grads, update)
    with pytest.raises(ValueError, match="'none', 'l2'"):
        mgda(grads, losses, normalization="L2")


def test_nash_mtl_solves_the_bargaining_equation():
    grads = random_grads()
    update, alpha = nash_mtl(grads, task_losses(grads))
    gram = grads @ grads.T
    gram = gram / torch.linalg.matrix_norm(gram)  # the authors' normalization
    assert (alpha > 0).all()
    assert (gram @ alpha - 1 / alpha).abs().max() < 1e-5
    # The normalization makes the update scale with the gradients, like plain descent: the lr keeps its meaning.
    update10, alpha10 = nash_mtl(10 * grads, task_losses(grads))
    torch.testing.assert_close(alpha10, alpha)
    torch.testing.assert_close(update10, 10 * update)


def test_aligned_mtl_sums_orthogonal_rows_of_equal_norm():
    grads = random_grads()
    update, _ = aligned_mtl(grads, task_losses(grads))
    # B G = sqrt(lambda_min) M^-1/2 G = s_min U V^T for G = U S V^T: orthogonal rows, all of norm s_min.
    u, s, vh = torch.linalg.svd(grads, full_matrices=False)
    aligned = s.min() * u @ vh
    torch.testing.assert_close(aligned @ aligned.T, s.min() ** 2 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(update, aligned.sum(0))


def test_aligned_mtl_ignores_directions_below_float32_precision():
    a, b = random_grads(2, dtype=torch.float32)
    grads = torch.stack([a, b, a + b + 1e-6 * random_grads(1, seed=1, dtype=torch.float32)[0]])
    update, _ = aligned_mtl(grads, task_losses(grads))
    # Kept, that ~1e-12 eigenvalue would be lambda_min and shrink the step to ~1e-6 of the gradients.
    assert update.norm() > 0.1 * grads.norm(dim=1).min()


def test_pcgrad_generator_picks_the_projection_order():
    # Three mutually conflicting tasks: projections do not commute, so the order changes the update.
    grads = torch.tensor([[1.0, 0.0], [-0.6, 0.8], [-0.6, -0.8]], dtype=torch.float64)
    seeded = [pcgrad(grads, task_losses(grads), generator=torch.Generator().manual_seed(seed))[0] for seed in range(8)]
    torch.testing.assert_close(pcgrad(grads, task_losses(grads), generator=torch.Generator().manual_seed(3))[0], seeded[3])
    assert any(not torch.allclose(seeded[0], other) for other in seeded[1:])


# Properties shared by every method.

def permutable_grads(name: str) -> torch.Tensor:
    if name not in ("pcgrad", "gradvac"):  # GradVac's first step, from targets 0, is PCGrad
        return random_grads()
    # PCGrad visits the other tasks in index order when no generator is given, and projections do not commute: a
    # permutation changes the update as soon as a task conflicts with two others. Only pairwise conflicts are
    # order-free, so: two conflicting pairs, and no conflict across the pairs.
    return torch.tensor([[-4.0, 1, 1, 0, 0, 1], [6, 1, 1, 0, 0, 0], [0, 0, 0, -4, 1, 0], [0, 1, 0, 6, 1, 0]],
                        dtype=torch.float64)


@pytest.mark.parametrize("name", METHODS)
def test_permuting_the_tasks_permutes_the_weights(name):
    grads = permutable_grads(name)
    perm = torch.tensor([2, 0, 3, 1])
    torch.manual_seed(0)  # GradDrop: the same draw per coordinate whatever the task order
    update, weights = METHODS[name](grads, torch.ones(4, dtype=torch.float64))
    torch.manual_seed(0)
    update_p, weights_p = METHODS[name](grads[perm], torch.ones(4, dtype=torch.float64)[perm])
    torch.testing.assert_close(update_p, update, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(weights_p, weights[perm], atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("name", [name for name in METHODS if name != "db_mtl"])  # db_mtl: the next test
def test_single_task_is_plain_gradient_descent(name):
    grads = random_grads(1)
    update, weights = METHODS[name](grads, torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(update, grads[0])
    torch.testing.assert_close(weights, torch.ones(1, dtype=torch.float64))


def test_db_mtl_single_task_descends_the_log_loss_with_momentum():
    # By design (the paper's loss-scale balancing) not plain descent: the gradient of log L, averaged over steps.
    grads, state = random_grads(1), {}
    update, weights = db_mtl(grads, torch.full((1,), 2.0, dtype=torch.float64), beta=0.9, state=state)
    torch.testing.assert_close(update, 0.1 * grads[0] / (2.0 + 1e-8))
    update, _ = db_mtl(grads, torch.full((1,), 4.0, dtype=torch.float64), beta=0.9, state=state)
    torch.testing.assert_close(update, (0.1 * 0.9 / (2.0 + 1e-8) + 0.1 / (4.0 + 1e-8)) * grads[0])


@pytest.mark.parametrize("name", [name for name in METHODS if name != "graddrop"])  # GradDrop masks coordinates
def test_update_is_the_weighted_sum_of_gradients(name):
    grads = random_grads(seed=2)
    update, weights = METHODS[name](grads, torch.ones(4, dtype=torch.float64))  # (db_mtl: true at its first step)
    torch.testing.assert_close(weights @ grads, update)


@pytest.mark.parametrize("name", METHODS)
def test_zero_gradients_give_no_nan(name):
    for grads in [torch.zeros(1, 5), torch.zeros(3, 5), torch.tensor([[1.0, 2, 0], [0, 0, 0], [-2, 1, 1]])]:
        update, weights = METHODS[name](grads, torch.ones(len(grads)))
        assert torch.isfinite(update).all() and torch.isfinite(weights).all(), grads
        if not grads.any():
            assert not update.any()


@pytest.mark.parametrize("name", METHODS)
def test_float32_in_float32_out(name):
    grads = random_grads(dtype=torch.float32)
    update, weights = METHODS[name](grads, torch.rand(4))
    assert update.shape == (50,) and weights.shape == (4,)
    assert update.dtype == weights.dtype == torch.float32
    assert torch.isfinite(update).all()


def test_bad_inputs_say_what_is_expected():
    with pytest.raises(ValueError, match=r"\[K, P\].*\(3,\)"):
        mgda(torch.ones(3), LOSSES)
    with pytest.raises(ValueError, match="rescale must be 0, 1 or 2"):
        cagrad(J, LOSSES, rescale=3)


# GradientCombination: unlabelled tasks and the stateful methods' state.

class TwoTasks(nn.Module):
    """A shared vector p and one head per task: L_a = w_a (p . x_a), L_b = w_b (p . x_b)."""

    def __init__(self):
        super().__init__()
        self.shared_p = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
        self.heads = nn.ParameterDict({"a": nn.Parameter(torch.tensor(1.0)), "b": nn.Parameter(torch.tensor(1.0))})

    def losses(self, labelled_a: bool = True) -> dict[str, torch.Tensor]:
        loss_a = self.heads["a"] * (self.shared_p @ torch.tensor([-1.0, 0.5, 1.0]))
        return {"a": loss_a if labelled_a else loss_a * 0.0,  # masked_task_loss's "no label": exactly 0, with a graph
                "b": self.heads["b"] * (self.shared_p @ torch.tensor([1.0, 2.0, 3.0]))}


@pytest.mark.parametrize("method", ["mgda", "imtl", "nash_mtl", "upgrad", "cagrad", "gradvac", "db_mtl"])
def test_an_unlabelled_task_drops_out_of_the_combination(method):
    # Issue 11: G = [[0, 0, 0], [1, 2, 3]] gave MGDA and IMTL-G a zero update: the shared parameters did not move.
    model = TwoTasks()
    combination = GradientCombination({"a": 1.0, "b": 1.0}, method=method)
    combination.backward(model.losses(labelled_a=False), model)
    alone = GradientCombination({"b": 1.0}, method=method)
    only_b = TwoTasks()
    alone.backward({"b": only_b.losses()["b"]}, only_b)
    torch.testing.assert_close(model.shared_p.grad, only_b.shared_p.grad)  # as if task a were absent
    assert model.shared_p.grad.abs().sum() > 0
    assert combination.weights()["a"] == 0.0
    # Said explicitly, with the same result (the loop knows from target_mask); a fresh one for the stateful methods.
    model.zero_grad()
    combination = GradientCombination({"a": 1.0, "b": 1.0}, method=method)
    combination.backward(model.losses(labelled_a=False), model, labelled={"a": False, "b": True})
    torch.testing.assert_close(model.shared_p.grad, only_b.shared_p.grad)


def test_no_labelled_task_leaves_the_shared_parameters_alone():
    model = TwoTasks()
    losses = {task: loss * 0.0 for task, loss in model.losses().items()}
    GradientCombination({"a": 1.0, "b": 1.0}, method="mgda").backward(losses, model)
    assert model.shared_p.grad is None  # no loss reached it: the optimizer skips it (no weight decay, no momentum)


def test_db_mtl_heads_descend_their_log_loss_as_libmtl_does():
    # LibMTL backpropagates each log(L_k + 1e-8) (mode='backward'): a head gets grad L_k / (L_k + 1e-8), not grad L_k.
    model = TwoTasks()
    GradientCombination({"a": 1.0, "b": 2.0}, method="db_mtl").backward(model.losses(), model)
    reference = TwoTasks()
    losses = reference.losses()
    for task, weight in (("a", 1.0), ("b", 2.0)):
        torch.log(weight * losses[task] + 1e-8).backward(retain_graph=True)
    for task in ("a", "b"):
        torch.testing.assert_close(model.heads[task].grad, reference.heads[task].grad)
    assert not torch.allclose(model.heads["b"].grad, torch.tensor(2.0 * 4.5))  # not grad (2 L_b) = 2 p . x_b


@pytest.mark.parametrize("method", ["gradvac", "db_mtl"])
def test_stateful_methods_resume_exactly_from_their_state_dict(method):
    def steps(combination, model, count, labelled_a=True):
        grads = []
        for _ in range(count):
            model.zero_grad()
            combination.backward(model.losses(labelled_a), model)
            grads.append(model.shared_p.grad.clone())
            with torch.no_grad():
                model.shared_p -= 0.3 * model.shared_p.grad
                model.heads["a"] += 0.2  # the gradients move from step to step: the state matters
        return grads

    whole_model, whole = TwoTasks(), GradientCombination({"a": 1.0, "b": 1.0}, method=method)
    expected = steps(whole, whole_model, 4)
    part_model, part = TwoTasks(), GradientCombination({"a": 1.0, "b": 1.0}, method=method)
    steps(part, part_model, 2)
    saved = {"weighting": part.state_dict(), "model": part_model.state_dict()}
    assert any(key.startswith("state_") for key in saved["weighting"])
    resumed_model, resumed = TwoTasks(), GradientCombination({"a": 1.0, "b": 1.0}, method=method)
    resumed.load_state_dict(saved["weighting"])  # a fresh module: its state buffers come from the checkpoint
    resumed_model.load_state_dict(saved["model"])
    for got, want in zip(steps(resumed, resumed_model, 2), expected[2:]):
        torch.testing.assert_close(got, want)
    # A step without task a's labels leaves task a's share of the state as it was.
    before = {key: value.clone() for key, value in resumed.state_dict().items() if key.startswith("state_")}
    steps(resumed, resumed_model, 1, labelled_a=False)
    after = resumed.state_dict()
    if method == "gradvac":
        assert torch.equal(after["state_pair_cos_target"], before["state_pair_cos_target"])  # only pairs with a
    else:
        assert torch.equal(after["state_task_grad_ema"][0], before["state_task_grad_ema"][0])
        assert not torch.equal(after["state_task_grad_ema"][1], before["state_task_grad_ema"][1])


def test_db_mtl_on_the_representation_is_refused_at_start_up():
    with pytest.raises(UserError, match="db_mtl.*loss.on=parameters"):
        GradientCombination({"a": 1.0}, method="db_mtl", on="representation")
