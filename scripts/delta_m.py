"""Δm of multi-task runs against single-task baselines (Maninis et al. 2019; Vandenhende et al. 2021):

    Δm = 1/K Σ_k (-1)^{l_k} (M_m,k - M_b,k) / M_b,k × 100 %

over the K (task, metric) pairs, l_k = 1 where lower is better (loss, mae, rmse). Positive = better than training
each task alone.

    python scripts/delta_m.py --baselines multirun/.../single-task-sweep --runs multirun/.../sweep [...]
        [--split test] [--which best|final] [--metrics img/accuracy img/macro_f1 size/mae] [--json]

Baselines are run folders (or sweep folders) whose config trains exactly one task; without --metrics each task
counts with its primary metric (the first of tasks.<task>.metrics). The work is done by mtmm/report/delta_m.py,
which `mtmm-report SWEEP_DIR baselines=DIR` uses too.
"""

import argparse
import json

from mtmm.errors import UserError, exit_with
# delta_m is not used here: tests/test_scripts.py imports it from this script
from mtmm.report.delta_m import baseline_metrics, delta_m, parse_metrics, run_delta_m  # noqa: F401
from mtmm.report.sweep import find_runs, markdown, read_run, run_names


def main() -> None:
    parser = argparse.ArgumentParser(description="Δm of multi-task runs against single-task baselines, in percent")
    parser.add_argument("--baselines", nargs="+", required=True, help="single-task run or sweep folders")
    parser.add_argument("--runs", nargs="+", required=True, help="multi-task run or sweep folders")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--which", default="best", choices=["best", "final"], help="best.pt or the last epoch")
    parser.add_argument("--metrics", nargs="+", default=[], help="TASK/METRIC to average over (default: primary)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    try:
        rows = delta_m_rows(args)
    except UserError as error:
        exit_with(error)
    shown = [{**row, "Δm %": f"{row['Δm %']:+.2f}"} for row in rows]
    print(json.dumps(rows, indent=2, ensure_ascii=False) if args.json else markdown(shown))


def delta_m_rows(args) -> list[dict]:
    baselines = baseline_metrics([read_run(folder) for folder in find_runs(args.baselines)], args.split, args.which)
    single = {task: values for task, (values, _) in baselines.items()}
    runs = [run for run in map(read_run, find_runs(args.runs)) if len(run["config"].get("tasks") or {}) > 1]
    if not runs:
        raise UserError(f"no multi-task run (config.yaml with two or more tasks) under {' '.join(args.runs)}")
    chosen, rows = parse_metrics(args.metrics), []
    for run, name in zip(runs, run_names(runs)):
        value, tasks = run_delta_m(run, single, args.split, args.which, chosen)
        rows.append({"run": name, "tasks": " ".join(tasks), "Δm %": value, "folder": str(run["folder"])})
    return rows


if __name__ == "__main__":
    main()
