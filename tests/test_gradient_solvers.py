"""The solvers behind the gradient methods, on the inputs real training produces: K up to 8, row norms 10^-3..10^3,
conflicting, near-parallel, exactly opposite and zero rows, more tasks than dimensions. Each method's own optimality
condition is checked, against an independent solver where one exists; the examples of issue 11 are regressions."""

import itertools

import numpy as np
import pytest
import scipy.optimize
import torch

import mtmm.weighting.gradient as gm

KINDS = ["plain", "conflict", "parallel", "opposite", "zero"]


def random_cases(n: int, seed: int = 0, kmax: int = 8) -> list[torch.Tensor]:
    """Ill-conditioned per-task gradient matrices, one kind after another (KINDS)."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        k = int(rng.integers(2, kmax + 1))
        p = int(rng.choice([max(1, k - 2), k, 3 * k, 40]))  # K > P included
        g = rng.standard_normal((k, p))
        kind = KINDS[i % len(KINDS)]
        if kind == "conflict":
            g[1:] = -rng.uniform(0.2, 2, (k - 1, 1)) * g[:1] + 0.3 * rng.standard_normal((k - 1, p))
        elif kind == "parallel":
            g[1] = g[0] + 1e-7 * rng.standard_normal(p)
        elif kind == "opposite":
            g[1] = -rng.uniform(0.1, 10) * g[0]
        elif kind == "zero":
            g[int(rng.integers(k))] = 0
        g *= 10.0 ** rng.uniform(-3, 3, (k, 1))
        cases.append(torch.from_numpy(g))
    return cases


CASES = random_cases(200)
ONES = torch.ones(8, dtype=torch.float64)


def sizes(grads: torch.Tensor) -> np.ndarray:
    return grads.norm(dim=1).numpy()


# Issue 11's examples.

def test_mgda_three_tasks_reaches_the_min_norm_vertex():
    grads = torch.tensor([[-203.0, 12.6, 97.5], [-0.0278, 0.1, -0.00978], [2.59, 5.58, -2.62]], dtype=torch.float64)
    update, weights = gm.mgda(grads, ONES[:3])
    torch.testing.assert_close(weights, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    assert update @ update == pytest.approx(0.0108684884, rel=1e-9)  # mtmm gave 0.106, at its step cap


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e3])
def test_cagrad_nearly_opposite_gradients(scale):
    # _project_simplex raised on this (any rescale); the optimum is the dual vertex e_2, so weak duality there is a
    # certificate: min_k g_k.d can be at most F(e_2) = g0.g2 + r ||g2||, and the update must reach it.
    grads = scale * torch.tensor([[-1.3993416336567621, -5.095559911516556e-11],
                                  [1.39934160270615, 5.095497114526726e-11]], dtype=torch.float64)
    update, weights = gm.cagrad(grads, ONES[:2], c=0.5, rescale=0)
    g0, r = grads.mean(0), 0.5 * grads.mean(0).norm()
    bound = g0 @ grads[1] + r * grads[1].norm()
    # d = weights @ G cancels two rows ~1e8 times its size: its round-off is ~1e-16 ||g||, not ~1e-16 ||d||.
    size = float(grads.norm(dim=1).max())
    assert (update - g0).norm() <= r + 1e-14 * size
    assert (grads @ update).min() >= bound - 1e-14 * size ** 2
    torch.testing.assert_close(update, g0 + r * grads[1] / grads[1].norm(), rtol=0, atol=1e-14 * size)


def test_nash_mtl_residual_with_gradient_norms_1e5_apart():
    grads = torch.tensor([[-0.471309, -0.32561, -1.292246, -1.572213], [-5e-06, -1.1e-05, -1e-05, 7e-06],
                          [-0.107081, 2.914126, 0.926342, -0.633188]], dtype=torch.float64)
    _, alpha = gm.nash_mtl(grads, ONES[:3])
    gram = grads @ grads.T
    gram = gram / torch.linalg.matrix_norm(gram)
    assert (alpha * (gram @ alpha) - 1).abs().max() < 1e-10  # the 1e-12 ridge left 0.18


# Every method's own optimality condition on the random cases.

def brute_force_min_norm(grads: np.ndarray) -> float:
    """min ||w G||^2 over the simplex: the best affine minimiser with w >= 0 over every subset of rows (small K)."""
    best = np.inf
    for size in range(1, len(grads) + 1):
        for subset in itertools.combinations(range(len(grads)), size):
            rows = grads[list(subset)]
            if size == 1:
                w = np.ones(1)
            else:
                diff = (rows[1:] - rows[0]).T
                coef = np.linalg.lstsq(diff, -rows[0], rcond=None)[0]
                w = np.concatenate([[1 - coef.sum()], coef])
            if (w >= -1e-12).all():
                best = min(best, float(np.sum((w @ rows) ** 2)))
    return best


def test_mgda_kkt_and_brute_force_on_random_cases():
    for grads in CASES:
        update, weights = gm.mgda(grads, ONES[:len(grads)])
        w, d, norm2 = weights.numpy(), update.numpy(), float(update @ update)
        gains, size = grads.numpy() @ d, sizes(grads)
        scale = size * (w @ size)  # the size of the terms that make up g_k.d
        assert (w >= 0).all() and w.sum() == pytest.approx(1, abs=1e-12)
        assert (gains >= norm2 - 1e-11 * scale).all()  # a descent direction for every task, to round-off
        assert np.abs(gains - norm2)[w > 0].max() <= 1e-11 * scale.max()  # equality on the support
        if len(grads) <= 5:
            assert norm2 <= brute_force_min_norm(grads.numpy()) * (1 + 1e-9) + 1e-15 * size.max() ** 2


def cagrad_reference_primal(grads: np.ndarray, c: float) -> float:
    """min_k g_k.d of the authors' recipe: scipy's SLSQP on the dual, then d = g0 + r G^T w / ||G^T w||."""
    k = len(grads)
    g0 = grads.mean(0)
    r = c * np.linalg.norm(g0)
    towards, gram = grads @ g0, grads @ grads.T

    def dual(w):
        return towards @ w + r * np.sqrt(max(w @ gram @ w, 0))

    starts = [np.full(k, 1 / k), *np.eye(k)]
    results = [scipy.optimize.minimize(dual, start, method="SLSQP", bounds=[(0, 1)] * k,
                                       constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}]) for start in starts]
    w = min(results, key=lambda res: res.fun).x
    x = w @ grads
    d = g0 + r * x / np.linalg.norm(x) if np.linalg.norm(x) > 0 else g0
    return float((grads @ d).min())


@pytest.mark.parametrize("c", [0.5, 0.9])
def test_cagrad_dual_gap_and_scipy_on_random_cases(c):
    for i, grads in enumerate(CASES):
        g = grads.numpy()
        update, weights = gm.cagrad(grads, ONES[:len(g)], c=c, rescale=0)
        d, g0 = update.numpy(), g.mean(0)
        r = c * np.linalg.norm(g0)
        assert np.linalg.norm(d - g0) <= r * (1 + 1e-9) + 1e-300
        primal = (g @ d).min()
        if r == 0:
            continue
        extra = weights.numpy() - 1 / len(g)
        scale = sizes(grads).max() * (np.linalg.norm(g0) + np.abs(extra) @ sizes(grads))
        if i % 5 == 0:  # the authors' solver never does better (SLSQP is slow: a fifth of the cases)
            assert primal >= cagrad_reference_primal(g, c) - 1e-9 * scale
        # Weak duality: min_k g_k.d <= F(w) for any w on the simplex, so the solver's dual point certifies d.
        _, dual = gm._cagrad_weights(gm._gram(grads)[1], g @ g0, float(g0 @ g0), c)
        x = dual @ g
        assert dual.min() >= 0 and dual.sum() == pytest.approx(1, abs=1e-12)
        assert g0 @ x + r * np.linalg.norm(x) - primal <= 1e-9 * scale  # the solver's own test is 1e-10


def bargaining_error(grads: torch.Tensor, weights: torch.Tensor, alpha: float) -> tuple[float, float]:
    """|w_i^(1/alpha) (M' w)_i - 1| over the tasks with weight, absolute and relative to w_i^(1/alpha) (|M'| w)_i."""
    gram = grads @ grads.T
    gram = gram / torch.linalg.matrix_norm(gram)
    on = weights > 0
    power = weights[on] ** (1 / alpha)
    residual = (power * (gram @ weights)[on] - 1).abs()
    return float(residual.max()), float((residual / (power * (gram.abs() @ weights)[on])).max())


def far_from_cancelling(grads: torch.Tensor) -> bool:
    """0 is at least 1e-2 away from the hull of the unit gradients (by scipy's NNLS on the lifted problem)."""
    unit = (grads / grads.norm(dim=1, keepdim=True)).numpy()
    v, _ = scipy.optimize.nnls(np.vstack([unit.T, np.ones(len(unit))]), np.r_[np.zeros(unit.shape[1]), 1.0])
    d = (v / v.sum()) @ unit
    return bool(d @ d > 1e-4)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0, 5.0])
def test_nash_and_fairgrad_residual_on_random_cases(alpha):
    for grads in CASES:
        k = len(grads)
        method = gm.nash_mtl if alpha == 1.0 else lambda *args: gm.fairgrad(*args, alpha=alpha)
        update, weights = method(grads, ONES[:k])
        assert (weights >= 0).all() and torch.isfinite(update).all()
        if (grads.norm(dim=1) > 0).all() and far_from_cancelling(grads):
            absolute, relative = bargaining_error(grads, weights, alpha)
            assert relative <= 1e-10 and absolute <= 1e-7  # (weights up to ~1e2 here: round-off times their square)
            assert (weights > 0).all()
        if alpha == 1.0:
            torch.testing.assert_close(gm.fairgrad(grads, ONES[:k], alpha=1.0)[0], update)  # FairGrad at 1 = Nash


def test_nash_and_fairgrad_match_least_squares():
    # The reference code's solver (scipy's least_squares from the uniform weights), on well-posed cases.
    for grads in CASES[:20]:
        if not ((grads.norm(dim=1) > 0).all() and far_from_cancelling(grads)):
            continue
        gram = (grads @ grads.T).numpy()
        gram = gram / np.linalg.norm(gram)
        for alpha in (1.0, 2.0):
            reference = scipy.optimize.least_squares(lambda w: gram @ w - w ** (-1 / alpha), np.ones(len(gram)),
                                                     bounds=(0, np.inf), xtol=1e-13, ftol=1e-13, gtol=1e-13,
                                                     max_nfev=300).x
            _, weights = gm.fairgrad(grads, ONES[:len(grads)], alpha=alpha)
            ours, theirs = (np.abs(w ** (1 / alpha) * (gram @ w) - 1).max() for w in (weights.numpy(), reference))
            assert ours <= max(theirs, 1e-10)  # never worse; equal where scipy converges (slowly, for large weights)
            if theirs < 1e-8:
                np.testing.assert_allclose(weights.numpy(), reference, rtol=1e-6)


def test_cancelling_tasks_leave_the_others_a_finite_nash_update():
    # g2 = -2 g1 (and g5 = g1 / 2) cancel: no update helps them all. The limit of the ridge-regularised problem keeps
    # them unchanged to first order and bargains among the others in the orthogonal complement.
    rng = np.random.default_rng(0)
    g, h, h2 = rng.standard_normal((3, 6))
    grads = torch.tensor(np.stack([g, -2 * g, h, h2, 0.5 * g]))
    update, weights = gm.nash_mtl(grads, ONES[:5])
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    assert abs(float(update @ grads[0])) < 1e-12 * float(update.norm() * grads[0].norm())
    projected = grads[2:4] - torch.outer(grads[2:4] @ grads[0], grads[0]) / (grads[0] @ grads[0])
    sub_update, _ = gm.nash_mtl(projected, ONES[:2])
    gram, sub = grads @ grads.T, projected @ projected.T
    torch.testing.assert_close(update * (torch.linalg.matrix_norm(sub) / torch.linalg.matrix_norm(gram)) ** 0.5,
                               sub_update, rtol=1e-9, atol=1e-12)


def test_upgrad_projections_match_scipy_nnls_and_conflict_with_no_task():
    for grads in CASES:
        g = grads.numpy()
        update, weights = gm.upgrad(grads, ONES[:len(g)])
        # Each g_i projected on {v : G v >= 0} is g_i + G^T l_i with l_i = argmin_{l >= 0} ||g_i + G^T l||.
        projections = [row + scipy.optimize.nnls(g.T, -row)[0] @ g for row in g]
        scale = sizes(grads).max() * (1 + np.abs(weights.numpy()).sum())
        np.testing.assert_allclose(update.numpy(), np.mean(projections, axis=0), rtol=0, atol=1e-9 * scale)
        assert (g @ update.numpy() >= -1e-10 * scale * sizes(grads)).all()


def pcgrad_by_the_paper(grads: np.ndarray) -> np.ndarray:
    projected = grads.copy()
    for i in range(len(grads)):
        for j in range(len(grads)):
            dot = projected[i] @ grads[j]
            if j != i and dot < 0:
                projected[i] -= dot / (grads[j] @ grads[j]) * grads[j]
    return projected.sum(0)


def gradvac_by_the_paper(grads: np.ndarray, target: np.ndarray, beta: float) -> np.ndarray:
    """Algorithm 1 of Wang et al. (2021) on explicit vectors, tasks in index order; updates target in place."""
    changed = grads.copy()
    for i in range(len(grads)):
        for j in range(len(grads)):
            if j == i or not np.linalg.norm(changed[i]) > 0 or not np.linalg.norm(grads[j]) > 0:
                continue
            phi = changed[i] @ grads[j] / (np.linalg.norm(changed[i]) * np.linalg.norm(grads[j]))
            t = target[i, j]
            if phi < t < 1:
                changed[i] = changed[i] + np.linalg.norm(changed[i]) * (
                    t * np.sqrt(1 - phi ** 2) - phi * np.sqrt(1 - t ** 2)) / (
                    np.linalg.norm(grads[j]) * np.sqrt(1 - t ** 2)) * grads[j]
                if np.linalg.norm(changed[i]) > 1e-6 * np.linalg.norm(grads[i]):  # (not cancelled to round-off)
                    assert changed[i] @ grads[j] / np.linalg.norm(changed[i]) / np.linalg.norm(grads[j]) == \
                        pytest.approx(t, abs=1e-6)  # the paper's promise: the pair now sits at its target cosine
            target[i, j] = (1 - beta) * t + beta * phi
    return changed.sum(0)


def test_pcgrad_and_gradvac_follow_the_papers_on_random_cases():
    # Not on near-parallel or exactly opposite pairs: there sqrt(1 - phi^2) is the sine of an angle of ~1e-7 (or 0)
    # taken from a cosine known to round-off, so any two implementations differ (torchjd's too).
    for i, grads in enumerate(CASES[:100]):
        if KINDS[i % len(KINDS)] in ("parallel", "opposite"):
            continue
        g = grads.numpy()
        scale = sizes(grads).max() * len(g) * 10
        np.testing.assert_allclose(gm.pcgrad(grads, ONES)[0].numpy(), pcgrad_by_the_paper(g), atol=1e-9 * scale,
                                   rtol=0)
        state, target = {}, np.zeros((len(g), len(g)))
        for step in range(3):  # the targets move: later steps raise the cosines above 0
            moved = grads * (1 + 0.1 * step) + 0.3 * step * grads.roll(1, dims=0)
            update, _ = gm.gradvac(moved, ONES, beta=0.5, state=state)
            np.testing.assert_allclose(update.numpy(), gradvac_by_the_paper(moved.numpy(), target, 0.5),
                                       atol=1e-8 * scale, rtol=0)
        np.testing.assert_allclose(state["pair_cos_target"].numpy(), target, atol=1e-9)


def test_db_mtl_follows_the_paper_over_steps():
    rng = np.random.default_rng(1)
    grads = [torch.from_numpy(rng.standard_normal((3, 7)) * 10.0 ** rng.uniform(-3, 3, (3, 1))) for _ in range(4)]
    losses = [torch.from_numpy(rng.uniform(0.1, 3, 3)) for _ in range(4)]
    state, ema = {}, np.zeros((3, 7))
    for step, (g, loss) in enumerate(zip(grads, losses), start=1):
        log_grads = g.numpy() / (loss.numpy()[:, None] + 1e-8)  # the gradient of log(L + 1e-8)
        rate = 0.9 / step ** 0.5
        ema = log_grads + rate * (ema - log_grads)
        norms = np.linalg.norm(ema, axis=1)
        expected = (norms.max() / norms) @ ema
        update, weights = gm.db_mtl(g, loss, beta=0.9, beta_sigma=0.5, state=state)
        np.testing.assert_allclose(update.numpy(), expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())
        np.testing.assert_allclose(weights.numpy(), norms.max() / norms * (1 - rate) / (loss.numpy() + 1e-8))
    assert float(state["step"]) == 4


def graddrop_by_the_paper(grads: torch.Tensor, draw: torch.Tensor, leak: float) -> torch.Tensor:
    purity = 0.5 * (1 + grads.sum(0) / grads.abs().sum(0))
    out = torch.zeros_like(grads[0])
    for row in grads:
        keep = ((purity > draw) & (row > 0)) | ((purity < draw) & (row < 0))
        out += (leak + (1 - leak) * keep.to(grads.dtype)) * row
    return out


@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_graddrop_follows_the_paper_and_keeps_one_sign(leak):
    for seed, grads in enumerate(CASES[:50]):
        torch.manual_seed(seed)
        draw = torch.rand(grads.shape[1], dtype=grads.dtype)
        torch.manual_seed(seed)
        update, shares = gm.graddrop(grads, ONES, leak=leak)
        scale = 1e-15 * float(grads.abs().sum(0).max())
        torch.testing.assert_close(update, graddrop_by_the_paper(grads, draw, leak), rtol=0, atol=scale)
        if leak == 0:  # per coordinate, the kept gradients share one sign: the update is one of the two sums
            positive, negative = grads.clamp(min=0).sum(0), grads.clamp(max=0).sum(0)
            assert (((update - positive).abs() <= scale) | ((update - negative).abs() <= scale)).all()
        assert torch.isfinite(shares).all()


# Golden values from torchjd 0.18.0 (a maintained implementation), on one 3 x 5 matrix.

GOLDEN = torch.tensor([[1.0, -2.0, 0.5, 3.0, -1.0], [-2.0, 1.0, 1.0, -1.0, 0.5], [0.5, 0.5, -3.0, 1.0, 2.0]],
                      dtype=torch.float64)


def test_golden_values_from_torchjd():
    # UPGrad(projector=QuadprogProjector(norm_eps=0, reg_eps=0)): its default 1e-4 ridge moves the answer.
    _, weights = gm.upgrad(GOLDEN, ONES[:3])
    torch.testing.assert_close(weights, torch.tensor([0.6642459147288833, 1.0370874922855848, 0.5387111048949766],
                                                     dtype=torch.float64), rtol=1e-9, atol=0)
    # FairGrad(alpha=2) weights on G / ||G G^T||_F^(1/2), the Gram normalisation used here.
    _, weights = gm.fairgrad(GOLDEN, ONES[:3], alpha=2.0)
    torch.testing.assert_close(weights, torch.tensor([4.04730126093366, 6.636395493108745, 2.8908894148349127],
                                                     dtype=torch.float64), rtol=1e-9, atol=0)  # scipy's ~1e-10
    # GradDrop() after torch.manual_seed(0): the same draws, so the same bits.
    torch.manual_seed(0)
    torch.testing.assert_close(gm.graddrop(GOLDEN, ONES[:3])[0],
                               torch.tensor([-2.0, -2.0, -3.0, -1.0, 2.5], dtype=torch.float64), rtol=0, atol=0)
    # GradVac(beta=0.5, eps=0) over three steps after torch.manual_seed(0) (its visiting order uses the global RNG).
    expected = [[1.7620124364047485, 2.4482758620689657, 1.5434007134363852],
                [1.1077935988395522, 2.017928412402944, 1.311435811789897],
                [1.0, 1.9745257075883411, 1.275809162525002]]
    torch.manual_seed(0)
    state = {}
    for step in range(3):
        grads = GOLDEN + 0.5 * step * torch.roll(GOLDEN, 1, dims=1)
        _, weights = gm.gradvac(grads, ONES[:3], beta=0.5, state=state, generator=torch.default_generator)
        torch.testing.assert_close(weights, torch.tensor(expected[step], dtype=torch.float64), rtol=1e-12, atol=0)


def test_against_torchjd_on_random_cases():
    aggregation = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("quadprog")
    from torchjd.linalg import QuadprogProjector

    upgrad = aggregation.UPGrad(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0))
    for seed, grads in enumerate(random_cases(40, seed=1, kmax=5)):
        if len(grads) > grads.shape[1] or not (grads.norm(dim=1) > 0).all():
            continue  # quadprog needs a positive definite Gram matrix
        gram = grads @ grads.T
        if torch.linalg.eigvalsh(gram / gram.diagonal().max()).min() < 1e-8:
            continue
        scale = float(grads.norm(dim=1).max())
        torch.testing.assert_close(gm.upgrad(grads, ONES)[0], upgrad(grads), rtol=0, atol=1e-6 * scale)
        torch.manual_seed(seed)
        expected = aggregation.GradDrop()(grads)
        torch.manual_seed(seed)
        torch.testing.assert_close(gm.graddrop(grads, ONES)[0], expected, rtol=0,
                                   atol=1e-15 * float(grads.abs().sum(0).max()))


# No method may raise on finite input.

EDGE_CASES = {
    "all zero": torch.zeros(3, 5),
    "one task": torch.tensor([[1e-3, -2e3, 0.5]]),
    "one zero task": torch.zeros(1, 4),
    "zero row": torch.tensor([[0.0, 0, 0], [1, 2, 3]]),
    "more tasks than dimensions": torch.tensor([[1.0, 0], [0, 1], [-1, -1], [0.5, -2], [3, 1]]),
    "exactly opposite": torch.tensor([[1.0, 2, -1], [-3.0, -6, 3]]),
    "three cancelling": torch.tensor([[1.0, 0], [-0.5, 0.8660254037844386], [-0.5, -0.8660254037844386]]),
    "near parallel": torch.tensor([[1.0, 2, 3], [1.0, 2, 3 + 1e-9], [1 + 1e-9, 2, 3]]),
    "norms 1e6 apart": torch.tensor([[1e3, -2e3, 5e2], [1e-3, 2e-3, -1e-3], [-3e2, 1e2, 7e2]]),
    "tiny": torch.tensor([[1e-150, -2e-150], [3e-150, 1e-150]], dtype=torch.float64),
    "huge": torch.tensor([[1e150, -2e150], [3e150, 1e150]], dtype=torch.float64),
}


@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("name", gm.METHODS)
def test_no_method_raises_on_finite_input(name, case):
    for dtype in (torch.float64, torch.float32):
        grads = EDGE_CASES[case].to(dtype)
        if dtype == torch.float32 and case in ("tiny", "huge"):
            continue  # not representable in float32
        update, weights = gm.METHODS[name](grads, torch.ones(len(grads), dtype=dtype))
        assert update.shape == grads.shape[1:] and weights.shape == grads.shape[:1]
        assert torch.isfinite(update).all() and torch.isfinite(weights).all(), (name, case, update, weights)
        if not grads.any():
            assert not update.any()


def test_random_cases_do_not_reach_a_solver_guard(caplog):
    # Reaching a guard is logged as a warning: none of the methods may stop short of its certificate.
    for grads in CASES[::2]:
        for name, method in gm.METHODS.items():
            method(grads, ONES[:len(grads)])
    assert not [r for r in caplog.records if "stopped at its guard" in r.getMessage()]
