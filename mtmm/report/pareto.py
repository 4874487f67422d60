"""The Pareto front of a sweep on two tasks: the runs no other run beats on both at once."""

import math


def pareto_front(points: list[tuple], higher_is_better: tuple[bool, bool] = (True, True)) -> list[int]:
    """Indices (in input order) of the points that no other point dominates, i.e. is at least as good on both
    coordinates and better on one. Equal points do not dominate each other; a point with a missing (None or NaN)
    coordinate is never on the front and dominates nothing."""
    signs = [1 if higher else -1 for higher in higher_is_better]
    scored = {i: (signs[0] * x, signs[1] * y) for i, (x, y) in enumerate(points)
              if x is not None and y is not None and not (math.isnan(x) or math.isnan(y))}

    def dominates(a, b):
        return a[0] >= b[0] and a[1] >= b[1] and a != b

    return [i for i, p in scored.items() if not any(dominates(q, p) for j, q in scored.items() if j != i)]
