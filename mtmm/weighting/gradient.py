"""Gradient-combining multi-task methods: per-task gradients G [K, P] -> one update [P] and its task weights [K].

Every method is a pure function `method(grads, losses, **options) -> (update, weights)`, update == weights @ grads;
the update replaces the plain sum of gradients and is descended (params -= lr * update). K is small and P large, so each
method works on the K x K Gram matrix M = G G^T (computed once, in float64, then moved to the CPU where the many tiny
solver steps cost no kernel launches or device syncs) and touches P again only for the final `weights @ grads`.
"""

from collections.abc import Callable

import torch
from torch import Tensor


def _gram(grads: Tensor) -> tuple[Tensor, Tensor]:
    """The float64 gradients (on their device) and their Gram matrix (on the CPU)."""
    if grads.ndim != 2 or grads.shape[0] == 0:
        raise ValueError(f"grads must be a [K, P] matrix of per-task gradients with K >= 1, got {tuple(grads.shape)}")
    g = grads.to(torch.float64)
    return g, (g @ g.T).cpu()


def _finish(weights: Tensor, g: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
    weights = weights.to(g.device)
    return (weights @ g).to(grads.dtype), weights.to(grads.dtype)


def _project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection onto {w >= 0, sum w = 1} (the sort-based algorithm of Duchi et al. 2008)."""
    u = v.sort(descending=True).values
    excess = u.cumsum(0) - 1
    count = torch.arange(1, len(v) + 1, dtype=v.dtype)
    rho = int((u - excess / count > 0).nonzero().max())
    return (v - excess[rho] / (rho + 1)).clamp_min(0)


def _minimize_on_simplex(f: Callable[[Tensor], Tensor], grad_f: Callable[[Tensor], Tensor], m: Tensor,
                         steps: int = 2000, tol: float = 1e-10) -> Tensor:
    """Projected gradient descent with backtracking for a convex f over the simplex, from the uniform weights.

    Deterministic, and exact at the vertices (the projection lands on them), which a softmax parametrisation never is.
    """
    k = m.shape[0]
    w = torch.full((k,), 1.0 / k, dtype=torch.float64)
    trace = float(m.trace())
    lr = 1.0 / trace if trace > 0 else 1.0  # both objectives here have curvature of the order of the Gram matrix
    for _ in range(steps):
        value, slope = f(w), grad_f(w)
        while True:
            new = _project_simplex(w - lr * slope)
            diff = new - w
            # Accepted steps strictly decrease f; once rounding hides the decrease, lr and diff shrink to tol.
            if f(new) <= value + slope @ diff + diff @ diff / (2 * lr) or lr < 1e-30:
                break
            lr /= 2
        w = new
        if diff.abs().max() < tol:
            break
        lr *= 2  # let the step grow back after a cautious stretch
    return w


def pcgrad(grads: Tensor, losses: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """PCGrad (Yu et al. 2020), "sum" reduction: each g_i loses its component along every g_j it conflicts with.

    The other tasks are visited in the order of `generator` (a CPU generator), as the paper's random shuffle, or in
    index order when it is None. Tracked as coefficients over the original rows, so the weights are exact.
    """
    g, m = _gram(grads)
    k = m.shape[0]
    coef = torch.eye(k, dtype=torch.float64)  # row i: the projected g_i as a combination of the original rows
    for i in range(k):
        order = torch.randperm(k, generator=generator) if generator is not None else torch.arange(k)
        for j in order.tolist():
            dot = coef[i] @ m[:, j]  # (projected g_i) . g_j
            if j != i and dot < 0:  # a zero g_j has dot 0 and is skipped, so no division by zero
                coef[i, j] -= dot / m[j, j]
    return _finish(coef.sum(0), g, grads)


def cagrad(grads: Tensor, losses: Tensor, *, c: float = 0.5, rescale: int = 1) -> tuple[Tensor, Tensor]:
    """CAGrad (Liu et al. 2021): the update within c*||g0|| of the mean gradient g0 that helps the worst task most.

    g0 is the mean over tasks, as in the authors' code and LibMTL (the sum would double the radius for K=2).
    Dual: w = argmin_{simplex} w.G g0 + c||g0|| ||G^T w||, solved to ~1e-9 (the reference code uses scipy SLSQP);
    d = g0 + c||g0|| / ||G^T w|| * G^T w, divided by 1 (rescale=0), 1 + c^2 (1) or 1 + c (2).
    """
    if rescale not in (0, 1, 2):
        raise ValueError(f"cagrad: rescale must be 0, 1 or 2, got {rescale!r}")
    g, m = _gram(grads)
    k = m.shape[0]
    if k == 1:  # nothing to avert: keep plain descent instead of the (1+c)/(1+c^2) step the formula would give
        return _finish(torch.ones(1, dtype=torch.float64), g, grads)
    mean = torch.full((k,), 1.0 / k, dtype=torch.float64)
    toward_mean = m @ mean  # G g0: each task's gradient . the mean gradient
    radius = c * max(float(mean @ toward_mean), 0.0) ** 0.5  # c ||g0||
    w = _minimize_on_simplex(lambda w: w @ toward_mean + radius * (w @ m @ w).clamp_min(0).sqrt(),
                             lambda w: toward_mean + radius * (m @ w) / (w @ m @ w).clamp_min(1e-300).sqrt(), m)
    gw_norm = max(float(w @ m @ w), 0.0) ** 0.5  # ||G^T w||, zero only when every gradient is
    weights = mean + (radius / gw_norm if gw_norm > 0 else 0.0) * w
    return _finish(weights / (1.0, 1.0 + c * c, 1.0 + c)[rescale], g, grads)


def mgda(grads: Tensor, losses: Tensor, *, normalization: str = "none") -> tuple[Tensor, Tensor]:
    """MGDA-UB (Sener & Koltun 2018): the min-norm point of the convex hull of the (normalized) gradients.

    Its update d has d.g_k >= ||d||^2 for every task. Exact closed form for K=2, projected gradient for K>2. The weights
    are over the raw gradients (the min-norm weights divided by the normalizers), so the update is the min-norm point
    itself and keeps that descent guarantee for every normalization.
    """
    if normalization not in ("none", "l2", "loss", "loss+"):
        raise ValueError(f"mgda: normalization must be 'none', 'l2', 'loss' or 'loss+', got {normalization!r}")
    g, m = _gram(grads)
    k = m.shape[0]
    scale = torch.ones(k, dtype=torch.float64)  # what each gradient is divided by (Sener & Koltun's options)
    if normalization in ("loss", "loss+"):
        scale = losses.detach().to(torch.float64).cpu().reshape(k)
    if normalization in ("l2", "loss+"):
        scale = scale * m.diagonal().clamp_min(0).sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a zero gradient or loss stays as it is
    m = m / scale[:, None] / scale[None, :]
    if k == 2:
        gap = m[0, 0] + m[1, 1] - 2 * m[0, 1]  # ||g1 - g2||^2
        first = ((m[1, 1] - m[0, 1]) / gap).clamp(0, 1) if gap > 0 else torch.tensor(0.5, dtype=torch.float64)
        w = torch.stack([first, 1 - first])
    else:
        w = _minimize_on_simplex(lambda w: w @ m @ w, lambda w: 2 * (m @ w), m)
    return _finish(w / scale, g, grads)


def imtl(grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
    """IMTL-G (Liu et al. 2021): weights summing to 1 whose update has the same projection on every unit gradient.

    Closed form with D = g_1 - g_k, U = u_1 - u_k (k >= 2): alpha_{2..K} = g_1 U^T (D U^T)^-1, here in Gram form. The
    pseudo-inverse keeps degenerate cases (equal or zero gradients, where any such weights do) finite.
    """
    g, m = _gram(grads)
    k = m.shape[0]
    norms = m.diagonal().clamp_min(0).sqrt()
    gu = m * torch.where(norms > 0, 1 / norms, torch.zeros_like(norms))  # gu[i, j] = g_i . u_j
    diff = torch.cat([torch.ones(k - 1, 1, dtype=torch.float64), -torch.eye(k - 1, dtype=torch.float64)], dim=1)
    rest = (gu[0] @ diff.T) @ torch.linalg.pinv(diff @ gu @ diff.T) if k > 1 else gu.new_zeros(0)
    return _finish(torch.cat([1 - rest.sum(0, keepdim=True), rest]), g, grads)


def aligned_mtl(grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
    """Aligned-MTL (Senushkin et al. 2023), the "scale by the smallest eigenvalue" variant of LibMTL.

    B = sqrt(lambda_min) V Lambda^-1/2 V^T over the non-negligible eigenpairs of M makes the rows of B G orthogonal
    with equal norms sqrt(lambda_min) (when G has full rank); the update is their sum, weights = B.sum(0).
    """
    g, m = _gram(grads)
    lam, vec = torch.linalg.eigh(m)
    # Eigenvalues under the input's own precision are noise: keeping them would make lambda_min, and the step, ~0.
    keep = lam > lam.max() * m.shape[0] * torch.finfo(grads.dtype).eps
    if not keep.any():  # all gradients zero: the update is zero whatever the weights; report the neutral ones
        return _finish(torch.ones(m.shape[0], dtype=torch.float64), g, grads)
    lam, vec = lam[keep], vec[:, keep]
    b = lam.min().sqrt() * (vec * lam.rsqrt()) @ vec.T
    return _finish(b.sum(0), g, grads)


def nash_mtl(grads: Tensor, losses: Tensor, *, max_iter: int = 50, tol: float = 1e-10) -> tuple[Tensor, Tensor]:
    """Nash-MTL (Navon et al. 2022): the bargaining solution alpha > 0 with M alpha = 1 / alpha, update alpha @ G.

    M is G G^T divided by its Frobenius norm, as in the authors' code: without it ||update|| = sqrt(K) whatever the
    gradients' scale, so the learning rate would mean something else (and K=1 would not be plain descent).
    alpha minimises the strictly convex 0.5 a.M a - sum(log a), whose gradient is the residual M a - 1/a: damped Newton
    that never leaves a > 0 reaches |residual| < tol in a handful of steps. A zero gradient can bargain for nothing
    (its equation has no solution) and gets weight 0; when a non-negative combination of the others is zero (g1 = -g2)
    no solution exists either, and a 1e-12 ridge on M keeps the weights finite (the update tends to 0 there).
    """
    g, m = _gram(grads)
    weights = torch.zeros(m.shape[0], dtype=torch.float64)
    active = m.diagonal() > 0
    if active.any():
        weights[active] = _bargain(m[active][:, active] / torch.linalg.matrix_norm(m), max_iter, tol)
    return _finish(weights, g, grads)


def _bargain(m: Tensor, max_iter: int, tol: float) -> Tensor:
    """Solve M a = 1/a, a > 0, by damped Newton on f(a) = 0.5 a.M a - sum(log a)."""
    m = m + 1e-12 * torch.eye(len(m), dtype=m.dtype)  # the ridge: f stays bounded below when no solution exists

    def f(a: Tensor) -> Tensor:
        return 0.5 * a @ m @ a - a.log().sum()

    a = m.diagonal().rsqrt()  # the exact answer when the gradients are orthogonal
    for _ in range(max_iter):
        residual = m @ a - 1 / a
        if residual.abs().max() < tol:
            break
        step = -torch.linalg.solve(m + torch.diag(a.pow(-2)), residual)  # Hessian: M + diag(1/a^2), always PD
        t, shrinking = 1.0, step < 0
        if shrinking.any():  # stop short of the boundary a = 0
            t = min(1.0, 0.99 * float((-a[shrinking] / step[shrinking]).min()))
        while f(a + t * step) > f(a) + 1e-4 * t * (residual @ step) and t > 1e-12:
            t /= 2
        a = a + t * step
    return a


METHODS = {"pcgrad": pcgrad, "cagrad": cagrad, "mgda": mgda, "imtl": imtl, "aligned_mtl": aligned_mtl,
           "nash_mtl": nash_mtl}
