"""The report of a sweep (mtmm-train -m: job folders 0/, 1/, ... under multirun/<date>/<time>): one row per job
with its overrides, every task's test metrics, Δm against single-task baselines when given and the time per step;
bar charts per task; and two tasks' metrics against each other with the Pareto front marked."""

from pathlib import Path

from mtmm.errors import UserError
from mtmm.report import figures
from mtmm.report.delta_m import LOWER_IS_BETTER, baseline_metrics, run_delta_m
from mtmm.report.pareto import pareto_front
from mtmm.report.sweep import (cell, find_runs, metric_columns, metric_value, primary_metrics, read_run, run_names,
                               seconds_per_step, shared_overrides, split_metrics)


def sweep_report(folder: Path, out: Path, baselines: str | None = None, tasks: str | None = None,
                 split: str = "test", which: str = "best") -> tuple[str, list[tuple]]:
    """(title, blocks) of the report of the sweep in `folder`; the figures are written to `out`."""
    runs = [read_run(path) for path in find_runs([folder])]
    names = [str(run["folder"].relative_to(folder)) for run in runs]
    columns = metric_columns(runs, which, split, every_metric=True)
    single = None
    if baselines is not None:
        found = baseline_metrics([read_run(path) for path in find_runs([baselines])], split, which)
        single = {task: values for task, (values, _) in found.items()}
    rows = []
    for run, name, overrides in zip(runs, names, run_names(runs)):
        metrics = split_metrics(run, which, split)
        row = {"job": name, "overrides": overrides, **{column: metric_value(metrics, column) for column in columns}}
        if single is not None:
            row["Δm %"] = run_delta_m(run, single, split, which)[0]
        row["s/step"] = seconds_per_step(run)
        rows.append(row)

    shared = sorted(shared_overrides(runs))
    about = (f"{len(runs)} jobs; {split} metrics of the {which} checkpoint of each"
             + (f"; every job also sets {' '.join(shared)}" if shared else "")
             + (f"; Δm against the single-task baselines in {baselines}" if baselines is not None else "") + ".")
    table_columns = list(rows[0])
    blocks = [("heading", "Jobs"), ("text", about),
              ("table", table_columns, [[cell(column, row[column]) for column in table_columns] for row in rows])]
    per_task = [column for column in columns if not column.startswith("mean/")]
    timed = any(row["s/step"] is not None for row in rows)
    figures.sweep_bars(names, per_task, rows, "s/step" if timed else None, out / "sweep_metrics.png")
    blocks += [("heading", "Per task"), ("figure", "sweep_metrics.png", f"{split} metrics of every job, per task")]
    blocks += pareto_blocks(runs, names, rows, tasks, out)
    return f"mtmm sweep {folder.resolve().name}", blocks


def chosen_tasks(runs: list[dict], tasks: str | None) -> list[str]:
    """The two tasks of tasks=A,B (checked against the runs' tasks), else the first two the runs train."""
    known = list(dict.fromkeys(task for run in runs for task in primary_metrics(run)))
    if tasks is None:
        return known[:2]
    picked = [task.strip() for task in tasks.split(",") if task.strip()]
    if len(picked) != 2 or picked[0] == picked[1]:
        raise UserError(f"tasks={tasks}: name two different tasks, e.g. tasks={','.join(known[:2]) or 'img,txt'}")
    for task in picked:
        if task not in known:
            raise UserError(f"tasks={tasks}: {task!r} is not a task of these runs ({', '.join(known)})")
    return picked


def pareto_blocks(runs: list[dict], names: list[str], rows: list[dict], tasks: str | None, out: Path) -> list[tuple]:
    picked = chosen_tasks(runs, tasks)
    if len(picked) < 2:
        return [("text", "The jobs train a single task: there is no trade-off between tasks to plot.")]
    metrics = {}
    for run in runs:
        for task, metric in primary_metrics(run).items():
            metrics.setdefault(task, metric)
    axes = [f"{task}/{metrics[task]}" for task in picked]
    points = [(row.get(axes[0]), row.get(axes[1])) for row in rows]
    higher = tuple(metrics[task] not in LOWER_IS_BETTER for task in picked)
    front = pareto_front(points, higher)
    labels = tuple(f"{axis} ({'higher' if up else 'lower'} is better)" for axis, up in zip(axes, higher))
    figures.pareto_scatter(names, points, front, labels, out / "pareto.png")
    return [("heading", f"{picked[0]} against {picked[1]}"),
            ("figure", "pareto.png", f"each job's {axes[0]} and {axes[1]}; ringed and joined: the Pareto front"),
            ("text", f"On the Pareto front (no other job is at least as good on both and better on one): job "
                     f"{', '.join(names[i] for i in front) or '–'}.")]
