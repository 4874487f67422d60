"""The exact solvers under mtmm/weighting/gradient.py's methods: small K x K problems in numpy float64, each stopping
at a certificate (see gradient.py's docstring), with a step guard that only logs when it is reached."""

import logging

import numpy as np

log = logging.getLogger("mtmm.weighting.gradient")

_TOL = 1e-12  # the active-set certificates, relative to the terms involved (round-off is ~1e-16 there)
_STATIONARY = 1e-12  # min-norm point of the unit gradients this close to 0: no bargaining solution exists


def _unconverged(method: str, what: str, value: float, tol: float) -> None:
    log.warning("%s: the solver stopped at its guard with %s %.3g (tolerance %.3g); the update is the best found",
                method, what, value, tol)


# Exact solvers on K x K problems (numpy float64).

def _factor(m: np.ndarray) -> np.ndarray:
    """Rows h_i in R^K with h_i . h_j = M_ij: the gradients in a K-dimensional basis, each exact to its own norm.

    From the eigendecomposition of the Gram matrix of the unit gradients (a zero gradient stays 0), so gradient norms
    10^6 apart keep their relative precision, which a decomposition of M itself would not. Eigenvalues at round-off
    level are dropped: their square roots (~1e-8) would make exactly dependent gradients (g2 = -c g1, K > P) merely
    nearly so, and a min-norm point that is exactly 0 a point of norm 1e-8.
    """
    norms = np.sqrt(np.clip(m.diagonal(), 0, None))
    safe = np.where(norms > 0, norms, 1.0)
    lam, vec = np.linalg.eigh(m / np.outer(safe, safe))
    lam = np.where(lam > len(m) * np.finfo(np.float64).eps * max(lam.max(), 0.0), lam, 0.0)
    return norms[:, None] * vec * np.sqrt(lam)


def _affine_min(x: np.ndarray) -> np.ndarray:
    """Weights summing to 1 of the point of least norm on the affine hull of the rows of x (least squares).

    Taken relative to the shortest row, with the difference vectors scaled to unit norm and one refinement step, so
    that rows of very different norms keep the residual at round-off.
    """
    if len(x) == 1:
        return np.ones(1)
    order = np.argsort(np.linalg.norm(x, axis=1))
    base, rest = x[order[0]], (x[order[1:]] - x[order[0]]).T
    size = np.linalg.norm(rest, axis=0)
    rest = rest / np.where(size > 0, size, 1.0)
    coef = np.linalg.lstsq(rest, -base, rcond=None)[0]
    coef = coef + np.linalg.lstsq(rest, -base - rest @ coef, rcond=None)[0]
    coef = coef / np.where(size > 0, size, 1.0)
    out = np.empty(len(x))
    out[order[0]], out[order[1:]] = 1 - coef.sum(), coef
    return out


def _min_norm_point(x: np.ndarray, tol: float = _TOL) -> tuple[np.ndarray, float]:
    """Weights w on the simplex minimising ||w @ x||: Wolfe's (1976) exact active-set method on explicit points.

    Returns w and the certificate's value, max_i (||d||^2 - x_i . d) / (||x_i|| sum_j w_j ||x_j||), <= tol on success:
    d = w @ x (equality on the support holds by construction). The scale is that of the terms that make up d, so the
    test is as strict for small gradients as for large ones. Finite in exact arithmetic; a guard stops cycling by
    round-off, and a point that cannot enter without leaving at once (affinely dependent to round-off) ends the search.
    """
    k = len(x)
    norms = np.linalg.norm(x, axis=1)
    w = np.zeros(k)
    w[int(np.argmin(norms))] = 1.0
    for _ in range(10 * k + 20):
        d = w @ x
        slack = x @ d - d @ d + tol * norms * (w @ norms)
        entering = int(np.argmin(slack))
        if slack[entering] >= 0:
            break
        if w[entering] > 0:  # the face's own minimiser is not reached to round-off: nothing left to add
            break
        support = np.flatnonzero(w > 0).tolist() + [entering]
        while True:  # Wolfe's minor cycle: move towards the face's affine minimiser, dropping points that reach 0
            v = np.zeros(k)
            v[support] = _affine_min(x[support])
            if (v[support] > 0).all():
                w = v
                break
            shrink = [s for s in support if v[s] <= 0]
            ratios = np.array([w[s] / (w[s] - v[s]) for s in shrink])
            t = float(ratios.min())
            w = w + t * (v - w)
            for s, ratio in zip(shrink, ratios):
                if ratio <= t:
                    w[s] = 0.0
            w = np.clip(w, 0, None)
            support = np.flatnonzero(w > 0).tolist()
        if w[entering] == 0 and t == 0:
            break
    d = w @ x
    size = norms * (w @ norms)
    return w, float(np.max(np.where(size > 0, (d @ d - x @ d) / np.where(size > 0, size, 1), 0.0)))


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A least-squares solution of a x = b, refined once, so that its residual is at round-off."""
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    return x + np.linalg.lstsq(a, b - a @ x, rcond=None)[0]


def _nnls(a: np.ndarray, y: np.ndarray, tol: float = _TOL) -> tuple[np.ndarray, float]:
    """min ||a v - y|| over v >= 0: Lawson & Hanson's active-set method, on explicit columns (least squares).

    Returns v and the certificate's value, max_j a_j . (y - a v) / (||a_j|| (||y|| + sum_i v_i ||a_i||)), <= tol on
    success (the KKT conditions; equality where v_j > 0 holds by construction). A column that enters and leaves at once (dependent on the
    passive ones to round-off) is blocked until the point moves, so rounding cannot make it cycle.
    """
    k = a.shape[1]
    norms = np.linalg.norm(a, axis=0)
    v, passive, blocked = np.zeros(k), np.zeros(k, bool), np.zeros(k, bool)
    for _ in range(10 * k + 20):
        dual = a.T @ (y - a @ v) - tol * norms * (np.linalg.norm(y) + v @ norms)
        candidates = ~passive & ~blocked & (dual > 0)
        if not candidates.any():
            break
        entering = int(np.argmax(np.where(candidates, dual, -np.inf)))
        passive[entering], moved = True, False
        while passive.any():
            idx = np.flatnonzero(passive)
            z = np.zeros(k)
            z[idx] = np.linalg.lstsq(a[:, idx], y, rcond=None)[0]
            if (z[idx] > 0).all():
                moved = moved or not np.array_equal(z, v)
                v = z
                break
            bad = idx[z[idx] <= 0]
            ratios = v[bad] / (v[bad] - z[bad])  # how far towards z each one can go before it reaches 0
            t = ratios.min()
            moved = moved or t > 0
            v = v + t * (z - v)
            passive[bad[ratios <= t]] = False
            v[~passive] = 0.0
        if moved:
            blocked[:] = False
        else:
            blocked[entering] = True
    size = norms * (np.linalg.norm(y) + v @ norms)
    excess = np.where((size > 0) & (v == 0), a.T @ (y - a @ v) / np.where(size > 0, size, 1), 0.0)
    return v, float(excess.max(initial=0.0))  # (where v > 0 the equation holds by construction)


def _bargain(m: np.ndarray, alpha: float, max_iter: int, tol: float) -> tuple[np.ndarray, float]:
    """a >= 0 with (M a)_i = a_i^(-1/alpha) (Nash-MTL at alpha = 1, FairGrad otherwise); returns a and its error.

    A solution exists exactly when 0 is not in the convex hull of the gradients. When it is, some tasks cancel (a
    non-negative combination of their gradients is 0, e.g. g1 = -c g2, or a zero gradient): no update helps them all,
    and as M + eps I -> M their weights grow without bound while the update tends to the bargaining update of the other
    tasks' gradients projected orthogonally to the cancelling ones (it leaves those unchanged to first order). That
    limit is what is computed: the cancelling set C is peeled off by repeated min-norm problems (distance of 0 to the
    hull of the unit gradients below _STATIONARY), the others bargain on their projections, and C gets the least
    non-negative weights (NNLS) that realise the projection.
    """
    k = len(m)
    a = np.zeros(k)
    norms = np.sqrt(np.clip(m.diagonal(), 0, None))
    cancel = ~(norms > 0)  # a zero gradient can bargain for nothing
    if cancel.all():
        return a, 0.0
    unit = m / np.outer(np.where(cancel, 1, norms), np.where(cancel, 1, norms))
    while True:
        rest, gone = np.flatnonzero(~cancel), np.flatnonzero(cancel)
        # The rest's Gram matrix after projecting out the span of the cancelling gradients (a Schur complement).
        basis = np.linalg.pinv(unit[np.ix_(gone, gone)]) @ unit[np.ix_(gone, rest)] if len(gone) else None
        left = unit[np.ix_(rest, rest)] - (unit[np.ix_(rest, gone)] @ basis if len(gone) else 0)
        length = np.sqrt(np.clip(left.diagonal(), 0, None))
        if (length <= _STATIONARY ** 0.5).any():  # in the span of the cancelling ones: cancels with them
            cancel[rest[length <= _STATIONARY ** 0.5]] = True
        else:
            left = left / np.outer(length, length)
            w, _ = _min_norm_point(_factor(left))
            if w @ left @ w >= _STATIONARY:
                break
            cancel[rest[w > 1e-9 * w.max()]] = True  # (round-off leaves ~1e-17 on tasks outside the combination)
        if cancel.all():
            return a, 0.0
    b, error = _newton_bargain(left, (norms[rest] * length) ** (1 / alpha - 1), alpha, max_iter, tol)
    a[rest] = b / (norms[rest] * length)
    if len(gone):
        # The projection subtracts basis @ a_rest from the cancelling gradients' (unit) weights; realise that vector
        # of span(C) = cone(C) with non-negative weights instead.
        target = -(basis @ (b / length))
        h = _factor(unit[np.ix_(gone, gone)])
        c, _ = _nnls(h.T, h.T @ target)
        a[gone] = c / np.where(norms[gone] > 0, norms[gone], 1)
    return a, error


def _newton_bargain(unit: np.ndarray, rho: np.ndarray, alpha: float, max_iter: int,
                    tol: float) -> tuple[np.ndarray, float]:
    """b > 0 with U b = rho * b^(-1/alpha) for a unit-diagonal U whose hull is away from 0; returns b and its error.

    With gradients scaled to unit norm (a = D^-1 b, D = diag(||g_i||), rho_i = ||g_i||^(1/alpha - 1)), norms 10^5 apart
    cost no precision. b minimises the strictly convex 0.5 b.U.b - sum_i rho_i phi(b_i), phi' = b^(-1/alpha), by damped
    Newton that never leaves b > 0, from the orthogonal-case answer scaled to the best point on its ray.
    The certificate: |r_i| <= tol b_i^(1/alpha) (|U| b)_i / rho_i for the residual r_i = b_i^(1/alpha) (U b)_i / rho_i
    - 1 = a_i^(1/alpha) (M a)_i - 1, i.e. b solves exactly the equation of a Gram matrix within a relative tol of U in
    every entry; Newton goes on to |r_i| <= tol while it still gains. Far from cancelling that is |r_i| <= tol; when
    the gradients nearly cancel, b grows like 1 / (distance of 0 to their hull) and r_i carries U's round-off times
    b^2, so the relative form is the most the data allows. Returns b and the relative error.
    """
    size = np.abs(unit)

    def phi(b: np.ndarray) -> np.ndarray:
        return np.log(b) if alpha == 1 else b ** (1 - 1 / alpha) / (1 - 1 / alpha)

    def f(b: np.ndarray) -> float:
        return float(0.5 * b @ unit @ b - rho @ phi(b))

    b = rho ** (alpha / (alpha + 1))  # the exact answer when the gradients are orthogonal
    b *= (rho @ b ** (1 - 1 / alpha) / (b @ unit @ b)) ** (alpha / (alpha + 1))  # the best multiple of it
    error, before = np.inf, np.inf
    for _ in range(max_iter):
        ub = unit @ b
        power = b ** (1 / alpha) / rho
        residual = np.abs(power * ub - 1)
        error = float((residual / (power * (size @ b))).max())
        # Done at an absolute residual of tol, or at the certificate once Newton stops gaining (round-off).
        if residual.max() <= tol or (error <= tol and residual.max() > 0.5 * before):
            break
        before = residual.max()
        slope = ub - rho * b ** (-1 / alpha)
        curvature = unit + np.diag(rho / alpha * b ** (-1 / alpha - 1))
        # Jacobi-scaled Newton system: unit diagonal and off-diagonal entries below 1, whatever the spread of b.
        d = curvature.diagonal() ** -0.5
        step = d * _solve(d[:, None] * curvature * d[None, :], -d * slope)
        decrement = float(-slope @ step)
        shrinking = step < 0
        t = min(1.0, 0.99 * float((b[shrinking] / -step[shrinking]).min())) if shrinking.any() else 1.0  # b > 0
        if decrement > 1e-2:  # else Newton's quadratic phase, where f may change below its own round-off
            value = f(b)
            while f(b + t * step) > value - 1e-4 * t * decrement and t > 1e-12:
                t /= 2
        b = b + t * step
    return b, error


def _frobenius(m: np.ndarray) -> float:
    """||M||_F without overflow for gradients near the float64 range (its square would be ~||g||^4)."""
    top = float(np.abs(m).max())
    return top * float(np.linalg.norm(m / top)) if top > 0 else 0.0


# The methods.
