"""Δm of multi-task runs against single-task baselines (Maninis et al. 2019; Vandenhende et al. 2021):

    Δm = 1/K Σ_k (-1)^{l_k} (M_m,k - M_b,k) / M_b,k × 100 %

over the K (task, metric) pairs, l_k = 1 where lower is better (loss, mae, rmse). Positive = better than training
each task alone. Baselines are runs whose config trains exactly one task; without chosen metrics each task counts
with its primary metric (the first of tasks.<task>.metrics).
"""

from pathlib import Path

from mtmm.errors import UserError
from mtmm.report.sweep import primary_metrics, split_metrics

LOWER_IS_BETTER = {"loss", "mae", "rmse", "ece", "brier"}  # as mtmm.loop.LOWER_IS_BETTER (not imported: it pulls in torch)


def delta_m(multi: dict[str, dict[str, float]], single: dict[str, dict[str, float]],
            metrics: dict[str, list[str]]) -> float:
    """Δm in percent of the multi-task metrics {task: {metric: value}} against the single-task ones, averaged over
    every (task, metric) in `metrics`. Raises ValueError naming the task and metric that cannot be compared."""
    terms = []
    for task, names in metrics.items():
        if task not in single:
            raise ValueError(f"task {task!r} has no single-task baseline (baselines train {sorted(single)})")
        for metric in names:
            base, value = single[task].get(metric), (multi.get(task) or {}).get(metric)
            if base is None or value is None:
                where = "baseline" if base is None else "multi-task run"
                raise ValueError(f"the {where} has no value for {task}/{metric}")
            if base == 0:
                raise ValueError(f"the baseline's {task}/{metric} is 0; Δm divides by it")
            sign = -1 if metric in LOWER_IS_BETTER else 1
            terms.append(sign * (value - base) / base)
    if not terms:
        raise ValueError("no metric to compare")
    return 100 * sum(terms) / len(terms)


def baseline_metrics(runs: list[dict], split: str, which: str) -> dict[str, tuple[dict, Path]]:
    """task -> (its metrics, folder) of the one single-task baseline that trains it."""
    found = {}
    for run in runs:
        tasks = list(run["config"].get("tasks") or {})
        if len(tasks) != 1:
            raise UserError(f"baseline {run['folder']} trains {len(tasks)} tasks {tasks}; a baseline trains "
                            f"exactly one")
        if tasks[0] in found:
            raise UserError(f"two baselines train task {tasks[0]!r}: {found[tasks[0]][1]} and {run['folder']}")
        found[tasks[0]] = (split_metrics(run, which, split).get(tasks[0]) or {}, run["folder"])
    return found


def parse_metrics(items: list[str]) -> dict[str, list[str]]:
    """['img/accuracy', 'img/macro_f1', 'size/mae'] -> {'img': ['accuracy', 'macro_f1'], 'size': ['mae']}."""
    chosen = {}
    for item in items:
        task, _, metric = item.partition("/")
        if not task or not metric:
            raise UserError(f"--metrics {item!r}: write TASK/METRIC, e.g. img/accuracy")
        chosen.setdefault(task, []).append(metric)
    return chosen


def run_delta_m(run: dict, single: dict, split: str, which: str, chosen: dict | None = None) -> tuple[float, list]:
    """(Δm, the tasks it averages over) of one run against the baselines' metrics {task: {metric: value}}; each
    task counts with its `chosen` metrics, else its primary one."""
    metrics = {task: (chosen or {}).get(task, [metric]) for task, metric in primary_metrics(run).items()}
    try:
        return delta_m(split_metrics(run, which, split), single, metrics), list(metrics)
    except ValueError as error:
        raise UserError(f"{run['folder']}: {error}") from None
