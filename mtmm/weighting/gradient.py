"""Gradient-combining multi-task methods: per-task gradients G [K, P] -> one update [P] and its task weights [K].

Every method is a function `method(grads, losses, **options) -> (update, weights)`; the update replaces the plain sum
of gradients and is descended (params -= lr * update). For all but GradDrop and DB-MTL, update == weights @ grads.
K is small and P large, so the methods work on the K x K Gram matrix M = G G^T (computed once, in float64, then moved
to the CPU, where the solvers' many tiny steps run in numpy without kernel launches or device syncs) and touch P
again only for the final `weights @ grads`.

Every optimisation problem is solved by an exact method and stops at a certificate, never at a step cap (a cap
remains as a guard only; reaching it is logged as a warning with the certificate's value). The simplex and NNLS
problems run on the gradients written as explicit vectors in R^K (_factor), each exact to its own norm, so norms 10^6
apart cost no precision; tolerances are relative to the size of the terms involved:
- MGDA: Wolfe's min-norm-point method (active set, finite); certificate: g_k.d >= ||d||^2 - 1e-12 ||g_k|| sum_j w_j
  ||g_j|| for every task (the Frank-Wolfe gap), with equality on the support.
- CAGrad: exact simplex QPs along a one-dimensional monotone path (regula falsi in log tau); certificate: the weak
  duality gap F(w) - min_k g_k.d <= 1e-10 max_k ||g_k|| (||g0|| + sum_j |beta_j| ||g_j||), d = g0 + beta @ G in the ball.
- Nash-MTL / FairGrad: damped Newton on a strictly convex function; certificate: |a_i^(1/alpha) (M a)_i - 1| <= 1e-10
  relative to a_i^(1/alpha) (|M| a)_i (an exact solution for a Gram matrix within 1e-10 of M), and <= 1e-10 absolute
  whenever Newton can still gain; tasks whose gradients cancel get the limit of the regularised problem (_bargain).
- UPGrad: Lawson-Hanson NNLS per task (active set, finite); certificate: each projection's KKT conditions to 1e-12.

Stateful methods (GradVac, DB-MTL) take `state`, a dict of tensors that they read and write; an absent entry starts
fresh, and the caller keeps the dict (GradientCombination as buffers, so state_dict() saves it). A name says the shape:
`pair_*` is [K, K] over task pairs, `task_*` is [K, ...] with a row per task, anything else is not per task.
"""

import logging

import numpy as np
import torch
from torch import Tensor

from mtmm.weighting.solvers import _TOL, _unconverged, _factor, _min_norm_point, _nnls, _bargain, _frobenius

log = logging.getLogger(__name__)



def _gram(grads: Tensor) -> tuple[Tensor, np.ndarray]:
    """The float64 gradients (on their device) and their Gram matrix (float64 numpy, on the CPU)."""
    if grads.ndim != 2 or grads.shape[0] == 0:
        raise ValueError(f"grads must be a [K, P] matrix of per-task gradients with K >= 1, got {tuple(grads.shape)}")
    g = grads.to(torch.float64)
    m = (g @ g.T).cpu().numpy()
    return g, (m + m.T) / 2  # exactly symmetric, whatever the matmul kernel did


def _finish(weights: np.ndarray | Tensor, g: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
    weights = torch.as_tensor(weights, dtype=torch.float64).to(g.device)
    return (weights @ g).to(grads.dtype), weights.to(grads.dtype)


def pcgrad(grads: Tensor, losses: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """PCGrad (Yu et al. 2020), "sum" reduction: each g_i loses its component along every g_j it conflicts with.

    The other tasks are visited in the order of `generator` (a CPU generator), as the paper's random shuffle, or in
    index order when it is None. Tracked as coefficients over the original rows, so the weights are exact.
    """
    g, m = _gram(grads)
    k = len(m)
    coef = np.eye(k)  # row i: the projected g_i as a combination of the original rows
    for i in range(k):
        order = torch.randperm(k, generator=generator).tolist() if generator is not None else range(k)
        for j in order:
            dot = coef[i] @ m[:, j]  # (projected g_i) . g_j
            if j != i and dot < 0:  # a zero g_j has dot 0 and is skipped, so no division by zero
                coef[i, j] -= dot / m[j, j]
    return _finish(coef.sum(0), g, grads)


def cagrad(grads: Tensor, losses: Tensor, *, c: float = 0.5, rescale: int = 1) -> tuple[Tensor, Tensor]:
    """CAGrad (Liu et al. 2021): the update within c*||g0|| of the mean gradient g0 that helps the worst task most.

    g0 is the mean over tasks, as in the authors' code and LibMTL (the sum would double the radius for K=2).
    Dual: w = argmin_{simplex} F(w) = w.G g0 + r ||G^T w||, r = c||g0||; d = g0 + r G^T w / ||G^T w||, divided by
    1 (rescale=0), 1 + c^2 (1) or 1 + c (2). The reference code runs scipy's SLSQP (to its default 1e-6); here: F's
    minimiser also minimises the QP w.G g0 + ||G^T w||^2 / (2 tau) at the tau where ||G^T w|| = r tau; that QP is the
    min-norm point of the shifted gradients g_k + tau g0 (exact, as MGDA), and ||G^T w(tau)|| / tau falls with tau
    (F's partial minimum is convex in 1/tau), so a safeguarded root search in log tau over exact QPs finds it. The
    certificate is weak duality: min_k g_k.d <= F(w) for every d in the ball, and the update stops within
    1e-10 max_k ||g_k|| (||g0|| + sum_j |beta_j| ||g_j||) of its dual point's F, d = g0 + beta @ G (the second term:
    the round-off of a d built from large, cancelling gradients). When 0 is in the hull and F's minimum is 0, the path
    ends inside the ball, at g0 projected on {d : G d >= 0}, which is then the update.
    """
    if rescale not in (0, 1, 2):
        raise ValueError(f"cagrad: rescale must be 0, 1 or 2, got {rescale!r}")
    if not c >= 0:
        raise ValueError(f"cagrad: c must be >= 0, got {c!r}")
    g, m = _gram(grads)
    k = len(m)
    if k == 1:  # nothing to avert: keep plain descent instead of the (1+c)/(1+c^2) step the formula would give
        return _finish(np.ones(1), g, grads)
    # G g0 and ||g0||^2 from g0 itself: through M they would lose all precision when the gradients nearly cancel.
    g0 = g.mean(0)
    weights, _ = _cagrad_weights(m, (g @ g0).cpu().numpy(), float(g0 @ g0), c)
    return _finish(weights / (1.0, 1.0 + c * c, 1.0 + c)[rescale], g, grads)


def _cagrad_weights(m: np.ndarray, b: np.ndarray, g0_sq: float, c: float) -> tuple[np.ndarray, np.ndarray]:
    """CAGrad's weights over the rows (d = weights @ G) and the dual point that certifies them (weak duality:
    min_k g_k.d <= F(dual) for every d in the ball), given M, b = G g0 and g0_sq = ||g0||^2."""
    k = len(m)
    mean = np.full(k, 1.0 / k)
    # The gradients and g0 as explicit vectors in R^(K+1), from the Gram matrix of [G; g0].
    h = _factor(np.block([[m, b[:, None]], [b[None, :], np.array([[g0_sq]])]]))
    h, h0 = h[:k], h[k]
    r = c * float(np.linalg.norm(h0))
    if not r > 0:  # g0 = 0 (or c = 0): the ball is the point g0
        return mean, _min_norm_point(h)[0]
    norms = np.linalg.norm(h, axis=1)

    def certify(dual: np.ndarray, extra: np.ndarray) -> float:
        """(F(dual) - min_k g_k.d) / its tolerance for d = g0 + extra @ G; inf when d leaves the ball.

        The tolerance is 1e-10 max||g_k|| (||g0|| + sum_j |extra_j| ||g_j||): the gains g_k.d carry the round-off of
        the terms that make up d, large when d's part along the hull is a small sum of large, cancelling gradients.
        """
        step = extra @ h
        if step @ step > r * r * (1 + 1e-9):
            return np.inf
        x = dual @ h
        gap = float(h0 @ x + r * np.linalg.norm(x) - (h @ (h0 + step)).min())
        return gap / (1e-10 * norms.max() * (r / c + np.abs(extra) @ norms))

    # The tau path ends (tau -> 0) at g0's projection on the cone {d : G d >= 0}, g0 + G^T lift; when 0 is in the hull
    # and that end lies in the ball, the path never meets the ball's edge and the end is the answer (F = 0 = gains).
    closest, _ = _min_norm_point(h)
    lift, _ = _nnls(h.T, -h0)
    best, dual, best_gap = lift, closest, certify(closest, lift)

    def point(log_tau: float) -> float:
        """Solve the QP at tau = e^log_tau, keep its update if it is the best so far; log(||G^T w|| / (r tau))."""
        nonlocal best, dual, best_gap
        tau = np.exp(log_tau)
        w, _ = _min_norm_point(h + tau * h0)
        s = float(np.linalg.norm(w @ h))
        if not s > 0:
            return -np.inf
        gap = certify(w, r / s * w)
        if gap < best_gap:
            best, dual, best_gap = r / s * w, w, gap
        return float(np.log(s / tau / r))

    # ||G^T w(tau)|| / tau falls with tau: bracket its crossing of r by doubling steps in log tau from tau = 1/c
    # (where ||G^T w|| ~ ||g0||), then close in by Illinois' regula falsi, superlinear and never leaving the bracket.
    lo = hi = float(-np.log(c))
    h_lo = h_hi = point(lo)
    step = 1.0
    while best_gap > 1 and (h_lo > 0) == (h_hi > 0) and step < 4096:
        if h_hi > 0:
            lo, h_lo, hi = hi, h_hi, hi + step
            h_hi = point(hi)
        else:
            hi, h_hi, lo = lo, h_lo, lo - step
            h_lo = point(lo)
        step *= 2
    side = 0
    for _ in range(200):  # a guard: the bracket shrinks to the root's round-off well before
        if best_gap <= 1 or not h_lo > 0 > h_hi or hi - lo <= 1e-15 * max(1.0, abs(lo)):
            break
        guess = hi - h_hi * (hi - lo) / (h_hi - h_lo) if np.isfinite(h_hi) else (lo + hi) / 2
        h_guess = point(guess)
        if h_guess > 0:
            lo, h_lo = guess, h_guess
            h_hi = h_hi / 2 if side == 1 else h_hi
            side = 1
        else:
            hi, h_hi = guess, h_guess
            h_lo = h_lo / 2 if side == -1 else h_lo
            side = -1
    if best_gap > 1:
        _unconverged("cagrad", "dual gap / its tolerance", best_gap, 1.0)
    return mean + best, dual


def mgda(grads: Tensor, losses: Tensor, *, normalization: str = "none") -> tuple[Tensor, Tensor]:
    """MGDA-UB (Sener & Koltun 2018): the min-norm point of the convex hull of the (normalized) gradients.

    Its update d has d.g_k >= ||d||^2 for every task. Solved exactly (see _min_norm; the paper's Frank-Wolfe stops at
    a step cap). The weights are over the raw gradients (the min-norm weights divided by the normalizers), so the
    update is the min-norm point itself and keeps that descent guarantee for every normalization.
    """
    if normalization not in ("none", "l2", "loss", "loss+"):
        raise ValueError(f"mgda: normalization must be 'none', 'l2', 'loss' or 'loss+', got {normalization!r}")
    g, m = _gram(grads)
    k = len(m)
    scale = np.ones(k)  # what each gradient is divided by (Sener & Koltun's options)
    if normalization in ("loss", "loss+"):
        scale = losses.detach().to(torch.float64).cpu().reshape(k).numpy()
    if normalization in ("l2", "loss+"):
        scale = scale * np.sqrt(np.clip(m.diagonal(), 0, None))
    scale = np.where(scale > 0, scale, 1.0)  # a zero gradient or loss stays as it is
    m = m / scale[:, None] / scale[None, :]
    w, violation = _min_norm_point(_factor(m))
    if violation > _TOL:
        _unconverged("mgda", "relative gap", violation, _TOL)
    return _finish(w / scale, g, grads)


def imtl(grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
    """IMTL-G (Liu et al. 2021): weights summing to 1 whose update has the same projection on every unit gradient.

    Closed form with D = g_1 - g_k, U = u_1 - u_k (k >= 2): alpha_{2..K} = g_1 U^T (D U^T)^-1, here in Gram form. The
    pseudo-inverse keeps degenerate cases (equal or zero gradients, where any such weights do) finite.
    """
    g, m = _gram(grads)
    k = len(m)
    norms = np.sqrt(np.clip(m.diagonal(), 0, None))
    gu = m * np.where(norms > 0, 1 / np.where(norms > 0, norms, 1), 0.0)  # gu[i, j] = g_i . u_j
    diff = np.concatenate([np.ones((k - 1, 1)), -np.eye(k - 1)], axis=1)
    rest = (gu[0] @ diff.T) @ np.linalg.pinv(diff @ gu @ diff.T) if k > 1 else np.zeros(0)
    return _finish(np.concatenate([[1 - rest.sum()], rest]), g, grads)


def aligned_mtl(grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
    """Aligned-MTL (Senushkin et al. 2023), the "scale by the smallest eigenvalue" variant of LibMTL.

    B = sqrt(lambda_min) V Lambda^-1/2 V^T over the non-negligible eigenpairs of M makes the rows of B G orthogonal
    with equal norms sqrt(lambda_min) (when G has full rank); the update is their sum, weights = B.sum(0).
    """
    g, m = _gram(grads)
    lam, vec = np.linalg.eigh(m)
    # Eigenvalues under the input's own precision are noise: keeping them would make lambda_min, and the step, ~0.
    keep = lam > lam.max() * len(m) * torch.finfo(grads.dtype).eps
    if not keep.any():  # all gradients zero: the update is zero whatever the weights; report the neutral ones
        return _finish(np.ones(len(m)), g, grads)
    lam, vec = lam[keep], vec[:, keep]
    b = lam.min() ** 0.5 * (vec / lam ** 0.5) @ vec.T
    return _finish(b.sum(0), g, grads)


def nash_mtl(grads: Tensor, losses: Tensor, *, max_iter: int = 50, tol: float = 1e-10) -> tuple[Tensor, Tensor]:
    """Nash-MTL (Navon et al. 2022): the bargaining solution alpha > 0 with M' alpha = 1 / alpha, update alpha @ G.

    Deviation from the authors' scale: here M' = G G^T / ||G G^T||_F, so that the update scales with the gradients
    (x10 gradients -> x10 update) like every other method, the learning rate keeps its meaning, and K = 1 is plain
    descent. The authors' code divides by the same norm but multiplies it back inside their constraint, so they solve
    alpha_i (G G^T alpha)_i = 1: their update is this one divided by ||G G^T||_F^(1/2), of norm sqrt(K) whatever the
    gradients, then clipped to norm 1 (max_norm=1) -- in effect normalized gradient descent, with its own learning
    rate. Solved by damped Newton to |alpha_i (M' alpha)_i - 1| <= tol alpha_i (|M'| alpha)_i, and <= tol outright
    while Newton still gains (see _newton_bargain; the authors stop a few CCP steps of ECOS at a residual norm of
    1e-3). Tasks whose gradients cancel (g1 = -c g2, a zero gradient) get the limit of the regularised problem, see
    _bargain: no update helps them all, so the others bargain in the directions that leave them unchanged.
    """
    g, m = _gram(grads)
    frobenius = _frobenius(m)
    if not frobenius > 0:
        return _finish(np.zeros(len(m)), g, grads)
    alpha, residual = _bargain(m / frobenius, 1.0, max_iter, tol)
    if residual > tol:
        _unconverged("nash_mtl", "relative residual", residual, tol)
    return _finish(alpha, g, grads)


def fairgrad(grads: Tensor, losses: Tensor, *, alpha: float = 1.0, max_iter: int = 100,
             tol: float = 1e-10) -> tuple[Tensor, Tensor]:
    """FairGrad (Ban & Ji 2024): alpha-fair weights w > 0 with (M' w)_i = w_i^(-1/alpha), update w @ G.

    alpha -> 0 tends to linear scalarisation, alpha = 1 is proportional fairness (Nash-MTL), alpha -> inf max-min
    fairness. Deviation: M' = G G^T / ||G G^T||_F as for Nash-MTL here (same reasons: the update scales with the
    gradients, K = 1 is plain descent); the paper, LibMTL and torchjd use G G^T itself, which gives this update times
    ||G G^T||_F^(-alpha/(alpha+1)). Solved as Nash-MTL (same certificate, with w_i^(1/alpha)); the reference code
    runs scipy's least_squares from the uniform weights, to its default tolerances (~1e-8).
    """
    if not alpha > 0:
        raise ValueError(f"fairgrad: alpha must be > 0, got {alpha!r}")
    g, m = _gram(grads)
    frobenius = _frobenius(m)
    if not frobenius > 0:
        return _finish(np.zeros(len(m)), g, grads)
    weights, residual = _bargain(m / frobenius, float(alpha), max_iter, tol)
    if residual > tol:
        _unconverged("fairgrad", "relative residual", residual, tol)
    return _finish(weights, g, grads)


def upgrad(grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
    """UPGrad (Quinton & Rey 2024): the mean of each gradient projected onto the dual cone {v : G v >= 0}.

    The projection of G^T u is G^T w with w = argmin w.M.w over w >= u (the paper's Proposition 1), solved exactly as
    NNLS in w - u; u = e_i / K (the mean). Every projection, so the update, conflicts with no task. torchjd adds
    1e-4 I to the trace-normalised Gram matrix so that quadprog always gets a positive definite one; the exact
    active-set method needs no such shift. Certificate: each projection's KKT conditions to 1e-12 max_k ||g_k||^2.
    """
    g, m = _gram(grads)
    k = len(m)
    h = _factor(m)
    weights = np.ones(k)  # each g_i itself, plus what its projection adds below; the mean divides by K
    for i in range(k):
        extra, violation = _nnls(h.T, -h[i])  # the projection of g_i; its mean share is 1/K of it
        if violation > _TOL:
            _unconverged("upgrad", "relative KKT violation", violation, _TOL)
        weights += extra
    return _finish(weights / k, g, grads)


def graddrop(grads: Tensor, losses: Tensor, *, leak: float = 0.0,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """GradDrop (Chen et al. 2020): per coordinate, keep only the gradients of one sign, drawn by sign purity.

    P = (1 + sum_i g_i / sum_i |g_i|) / 2; with one uniform draw U per coordinate, g_i is kept where (P > U and
    g_i > 0) or (P < U and g_i < 0); update = sum_i (leak + (1 - leak) mask_i) g_i. As torchjd: per coordinate of G.
    The paper places a GradDrop layer on activations, summing sign-corrected gradients over the batch before
    computing P; with per-task gradients on the parameters (or the flattened fused representation, loss.on=
    representation) there is no batch axis to sum over. The draws come from `generator` (a CPU generator) or, when
    None, torch's global RNG on the gradients' device; seeded the same, the latter matches torchjd's GradDrop bit for
    bit. In training, GradientCombination passes a generator seeded by the run's seed and the step, so that every
    process of a distributed run draws the same numbers. The update is not a weighted sum of the rows: weights[i] is the share of
    ||g_i||^2 that passed, g_i.kept_i / ||g_i||^2 (1 for a zero gradient).
    """
    if not 0 <= leak <= 1:
        raise ValueError(f"graddrop: leak must be in [0, 1], got {leak!r}")
    if grads.ndim != 2 or grads.shape[0] == 0:
        raise ValueError(f"grads must be a [K, P] matrix of per-task gradients with K >= 1, got {tuple(grads.shape)}")
    magnitude = grads.abs().sum(0)
    purity = 0.5 * (1 + grads.sum(0) / torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude)))
    if generator is None:
        draw = torch.rand(purity.shape, dtype=grads.dtype, device=grads.device)
    else:  # a CPU generator (GradientCombination's: the same draws in every process of a distributed run)
        draw = torch.rand(purity.shape, dtype=grads.dtype, generator=generator).to(grads.device)
    mask = ((purity > draw) & (grads > 0)) | ((purity < draw) & (grads < 0))
    kept = (leak + (1 - leak) * mask.to(grads.dtype)) * grads
    g = grads.to(torch.float64)
    norms = (g * g).sum(1)
    shares = torch.where(norms > 0, (kept.to(torch.float64) * g).sum(1) / torch.where(norms > 0, norms, 1), 1.0)
    return kept.sum(0), shares.to(grads.dtype)


def gradvac(grads: Tensor, losses: Tensor, *, beta: float = 0.5, state: dict | None = None,
            generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Gradient Vaccine (Wang et al. 2021): raise each pair's cosine to a moving target instead of only to 0.

    For each i, over the other tasks j (in `generator`'s order as PCGrad, index order when None): phi = cos(g_i', g_j);
    if phi < target_ij, g_i' += ||g_i'|| (t sqrt(1-phi^2) - phi sqrt(1-t^2)) / (||g_j|| sqrt(1-t^2)) g_j, which makes
    cos(g_i', g_j) = t exactly; then target_ij <- (1 - beta) target_ij + beta phi. update = sum_i g_i'. In Gram form
    with coefficients over the original rows, so the weights are exact. Targets start at 0 (the first step is PCGrad)
    and are `state["pair_cos_target"]`. beta = 0.5 is LibMTL's and torchjd's default (the paper tunes it). They add
    1e-8 to the denominators; here a pair with a zero gradient is skipped (its cosine is undefined and it would not
    move the update), as is a target of 1, which no finite step reaches. Whole-model grouping (LibMTL's group_type 0).
    """
    g, m = _gram(grads)
    k = len(m)
    state = {} if state is None else state
    saved = state.get("pair_cos_target")
    target = saved.detach().cpu().to(torch.float64).numpy().copy() if saved is not None else np.zeros((k, k))
    norms = np.sqrt(np.clip(m.diagonal(), 0, None))
    coef = np.eye(k)
    for i in range(k):
        others = [j for j in range(k) if j != i]
        if generator is not None:
            others = [others[t] for t in torch.randperm(k - 1, generator=generator).tolist()]
        for j in others:
            norm_i = max(float(coef[i] @ m @ coef[i]), 0.0) ** 0.5
            if norm_i == 0 or norms[j] == 0:
                continue
            phi = float(np.clip(coef[i] @ m[:, j] / (norm_i * norms[j]), -1.0, 1.0))
            t = target[i, j]
            if phi < t < 1:
                coef[i, j] += norm_i * (t * (1 - phi * phi) ** 0.5 - phi * (1 - t * t) ** 0.5) / (
                    norms[j] * (1 - t * t) ** 0.5)
            target[i, j] = (1 - beta) * t + beta * phi
    state["pair_cos_target"] = torch.from_numpy(target)
    return _finish(coef.sum(0), g, grads)


def db_mtl(grads: Tensor, losses: Tensor, *, beta: float = 0.9, beta_sigma: float = 0.0,
           state: dict | None = None) -> tuple[Tensor, Tensor]:
    """DB-MTL (Lin et al. 2023): balance loss scales by a log, then gradient magnitudes to the largest one.

    g_i^log = grad log(L_i + 1e-8) = g_i / (L_i + 1e-8) (the log also removes lambda_i); an EMA per task,
    h_i <- g_i^log + beta / step^beta_sigma (h_i - g_i^log) from h = 0 (`state["task_grad_ema"]`, [K, P] in the
    gradients' dtype, and `state["step"]`); update = sum_i (max_j ||h_j|| / ||h_i||) h_i, as LibMTL (which adds 1e-8
    to ||h_i||; here a task with h_i = 0 gets 0). The update is not a weighted sum of this step's rows and does not
    scale with the gradients (||update|| <= K max ||h_j||, by design): weights[i] is the factor on this step's g_i,
    (1 - beta / step^beta_sigma) max_j ||h_j|| / ||h_i|| / (L_i + 1e-8). Only meaningful on the parameters.
    """
    if grads.ndim != 2 or grads.shape[0] == 0:
        raise ValueError(f"grads must be a [K, P] matrix of per-task gradients with K >= 1, got {tuple(grads.shape)}")
    state = {} if state is None else state
    step = float(state.get("step", torch.zeros(()))) + 1
    scale = 1 / (losses.detach().to(grads.device, torch.float64).reshape(-1) + 1e-8)
    log_grads = grads * scale.to(grads.dtype)[:, None]
    ema = state.get("task_grad_ema")
    ema = torch.zeros_like(grads) if ema is None else ema.to(grads.device, grads.dtype)
    rate = beta / step ** beta_sigma
    ema = log_grads + rate * (ema - log_grads)
    norms = ema.to(torch.float64).norm(dim=1)
    balance = torch.where(norms > 0, norms.max() / torch.where(norms > 0, norms, 1), 0.0)
    state["task_grad_ema"], state["step"] = ema, torch.tensor(step, dtype=torch.float64)
    return (balance.to(grads.dtype) @ ema), (balance * (1 - rate) * scale).to(grads.dtype)


METHODS = {"pcgrad": pcgrad, "cagrad": cagrad, "mgda": mgda, "imtl": imtl, "aligned_mtl": aligned_mtl,
           "nash_mtl": nash_mtl, "upgrad": upgrad, "graddrop": graddrop, "gradvac": gradvac, "db_mtl": db_mtl,
           "fairgrad": fairgrad}
