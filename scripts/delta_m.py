"""Δm of multi-task runs against single-task baselines (Maninis et al. 2019; Vandenhende et al. 2021):

    Δm = 1/K Σ_k (-1)^{l_k} (M_m,k - M_b,k) / M_b,k × 100 %

over the K (task, metric) pairs, l_k = 1 where lower is better (loss, mae, rmse). Positive = better than training
each task alone.

    python scripts/delta_m.py --baselines multirun/.../single-task-sweep --runs multirun/.../sweep [...]
        [--split test] [--which best|final] [--metrics img/accuracy img/macro_f1 size/mae] [--json]

Baselines are run folders (or sweep folders) whose config trains exactly one task; without --metrics each task
counts with its primary metric (the first of tasks.<task>.metrics).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sweep_table.py, beside this file
from sweep_table import fail, find_runs, markdown, primary_metrics, read_run, run_names, split_metrics  # noqa: E402

LOWER_IS_BETTER = {"loss", "mae", "rmse"}


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
            fail(f"baseline {run['folder']} trains {len(tasks)} tasks {tasks}; a baseline trains exactly one")
        if tasks[0] in found:
            fail(f"two baselines train task {tasks[0]!r}: {found[tasks[0]][1]} and {run['folder']}")
        found[tasks[0]] = (split_metrics(run, which, split).get(tasks[0]) or {}, run["folder"])
    return found


def parse_metrics(items: list[str]) -> dict[str, list[str]]:
    """['img/accuracy', 'img/macro_f1', 'size/mae'] -> {'img': ['accuracy', 'macro_f1'], 'size': ['mae']}."""
    chosen = {}
    for item in items:
        task, _, metric = item.partition("/")
        if not task or not metric:
            fail(f"--metrics {item!r}: write TASK/METRIC, e.g. img/accuracy")
        chosen.setdefault(task, []).append(metric)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description="Δm of multi-task runs against single-task baselines, in percent")
    parser.add_argument("--baselines", nargs="+", required=True, help="single-task run or sweep folders")
    parser.add_argument("--runs", nargs="+", required=True, help="multi-task run or sweep folders")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--which", default="best", choices=["best", "final"], help="best.pt or the last epoch")
    parser.add_argument("--metrics", nargs="+", default=[], help="TASK/METRIC to average over (default: primary)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()

    baselines = baseline_metrics([read_run(folder) for folder in find_runs(args.baselines)], args.split, args.which)
    single = {task: values for task, (values, _) in baselines.items()}
    runs = [run for run in map(read_run, find_runs(args.runs)) if len(run["config"].get("tasks") or {}) > 1]
    if not runs:
        fail(f"no multi-task run (config.yaml with two or more tasks) under {' '.join(args.runs)}")
    chosen, rows = parse_metrics(args.metrics), []
    for run, name in zip(runs, run_names(runs)):
        metrics = {task: chosen.get(task, [metric]) for task, metric in primary_metrics(run).items()}
        try:
            value = delta_m(split_metrics(run, args.which, args.split), single, metrics)
        except ValueError as error:
            fail(f"{run['folder']}: {error}")
        rows.append({"run": name, "tasks": " ".join(metrics), "Δm %": value, "folder": str(run["folder"])})
    shown = [{**row, "Δm %": f"{row['Δm %']:+.2f}"} for row in rows]
    print(json.dumps(rows, indent=2, ensure_ascii=False) if args.json else markdown(shown))


if __name__ == "__main__":
    main()
