"""The runs of one or more sweeps as table rows: each task's metrics, mean accuracy, seconds per step (what
scripts/sweep_table.py prints and mtmm-report's sweep table holds).

A run is a folder with summary.json (mtmm-train writes it last, so a crashed run is not listed). Rows are named by
the overrides that differ between runs (.hydra/overrides.yaml), or by config values read from config.yaml
(`loss` gives the method, e.g. pcgrad or uncertainty; `fusion` the class, e.g. LateFusion).
"""

import re
from pathlib import Path

from mtmm.errors import UserError
from mtmm.report.read import read_json, read_jsonl, read_yaml

MISSING = "–"


def find_runs(dirs: list) -> list[Path]:
    """Every folder with a summary.json at or below each dir, in the order a person would list them (job 10 after 9)."""
    runs = []
    for given in map(Path, dirs):
        if not given.is_dir():
            raise UserError(f"{given} is not a folder")
        found = sorted((path.parent for path in given.rglob("summary.json")), key=lambda path: [
            int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))])
        if not found:
            raise UserError(f"no runs under {given} (no summary.json in it or below it)")
        runs += [path for path in found if path not in runs]
    return runs


def read_run(folder: Path) -> dict:
    """summary.json, config.yaml, the overrides and the number of optimizer steps of one run folder."""
    folder = Path(folder)
    summary = read_json(folder / "summary.json")
    config = read_yaml(folder / "config.yaml")
    overrides_file, metrics_file = folder / ".hydra" / "overrides.yaml", folder / "metrics.jsonl"
    overrides = [str(item) for item in read_yaml(overrides_file) or []] if overrides_file.is_file() else []
    steps = None
    if metrics_file.is_file():  # validation records carry the step count too, whatever trainer.log_every was
        steps = max((record.get("step") or 0 for record in read_jsonl(metrics_file)), default=0) or None
    return {"folder": folder, "summary": summary, "config": config if isinstance(config, dict) else {},
            "overrides": overrides, "steps": steps}


def split_metrics(run: dict, which: str, split: str) -> dict:
    """{task: {metric: value}} of summary.json's `which` (best or final) checkpoint on `split`."""
    try:
        metrics = run["summary"][which][split]
    except (KeyError, TypeError):
        metrics = None
    if not isinstance(metrics, dict):
        raise UserError(f"{run['folder'] / 'summary.json'} has no {which}.{split} metrics")
    return metrics


def task_metrics(run: dict) -> dict[str, list[str]]:
    """task -> the metrics listed in its config, in that order (the first is the task's primary metric)."""
    tasks = run["config"].get("tasks") or {}
    return {task: list(spec["metrics"]) for task, spec in tasks.items()
            if isinstance(spec, dict) and spec.get("metrics")}


def primary_metrics(run: dict) -> dict[str, str]:
    """task -> the first metric listed in its config (what the run reports first)."""
    return {task: names[0] for task, names in task_metrics(run).items()}


def config_value(config: dict, key: str) -> str:
    """A readable value of a dotted config key: a group (loss, fusion) by its `method` or `_target_` class name."""
    value = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, dict):
        if "method" in value:
            return str(value["method"])
        name = str(value.get("_target_", MISSING)).rsplit(".", 1)[-1]
        if key == "loss":  # StaticWeighting -> static, Uncertainty -> uncertainty
            return name.lower().removesuffix("weighting") or name.lower()
        return name
    return MISSING if value is None else str(value)


def shared_overrides(runs: list[dict]) -> set[str]:
    """The overrides every run has (none when there is only one run: then all of its overrides name it)."""
    return set.intersection(*(set(run["overrides"]) for run in runs)) if len(runs) > 1 else set()


def run_names(runs: list[dict]) -> list[str]:
    """Each run's overrides that are not shared by every run (all of them when there is only one run)."""
    shared = shared_overrides(runs)
    return [" ".join(item for item in run["overrides"] if item not in shared) or "(defaults)" for run in runs]


def is_baseline(run: dict, key: str, value: str) -> bool:
    """The run sets key=value by override, or its config says so (loss=static, fusion=late ~ LateFusion)."""
    actual = config_value(run["config"], key).lower()
    return f"{key}={value}" in run["overrides"] or actual in (value.lower(), value.lower() + key.rsplit(".")[-1])


def pick_baseline(run: dict, baselines: list[dict], key: str) -> dict | None:
    """The baseline run whose other overrides are the same as this run's; else the only baseline run."""
    def others(r: dict) -> set[str]:
        return {item for item in r["overrides"] if not item.startswith(f"{key}=")}
    same = [base for base in baselines if others(base) == others(run)]
    return same[0] if len(same) == 1 else baselines[0] if len(baselines) == 1 else None


def seconds_per_step(run: dict) -> float | None:
    """summary.json's wall time over the optimizer steps in metrics.jsonl (setup and evaluation included)."""
    wall = run["summary"].get("wall_time_s")
    return wall / run["steps"] if isinstance(wall, (int, float)) and run["steps"] else None


def metric_columns(runs: list[dict], which: str, split: str, every_metric: bool = False) -> list[str]:
    """"task/metric" of each task's primary metric (or, with `every_metric`, all its configured ones), and
    mean/accuracy when the runs report it."""
    columns = []
    for run in runs:
        for task, names in task_metrics(run).items():
            columns += [f"{task}/{metric}" for metric in (names if every_metric else names[:1])]
    columns = list(dict.fromkeys(columns))
    if any("accuracy" in (split_metrics(run, which, split).get("mean") or {}) for run in runs):
        columns.append("mean/accuracy")
    return columns


def metric_value(metrics: dict, column: str):
    task, metric = column.split("/")
    return (metrics.get(task) or {}).get(metric)


def build_rows(runs: list[dict], split: str, which: str, by: list[str], baseline: str | None) -> list[dict]:
    """One row per run: its name, each task's primary metric, s/step and, with `baseline` (KEY=VALUE), the time per
    step over that of the baseline run."""
    names = run_names(runs)
    columns = metric_columns(runs, which, split)
    if baseline is not None:
        key, _, value = baseline.partition("=")
        baselines = [run for run in runs if value and is_baseline(run, key, value)]
        if not baselines:
            raise UserError(f"--baseline {baseline}: no run matches; use KEY=VALUE as in the runs' overrides, "
                            f"e.g. loss=static")
    rows = []
    for run, name in zip(runs, names):
        metrics = split_metrics(run, which, split)
        row = {key: config_value(run["config"], key) for key in by} if by else {"run": name}
        row.update({column: metric_value(metrics, column) for column in columns})
        row["s/step"] = seconds_per_step(run)
        if baseline is not None:
            base = pick_baseline(run, baselines, key)
            base_time = seconds_per_step(base) if base is not None else None
            row[f"× {value}"] = row["s/step"] / base_time if row["s/step"] is not None and base_time else None
        row["folder"] = str(run["folder"])
        rows.append(row)
    return rows


def cell(column: str, value) -> str:
    """How a table shows a value: metrics with 4 decimals, s/step with 3 digits, ratios as 1.23×, Δm as +1.23."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        if column.startswith("×"):
            return f"{value:.2f}×"
        if column == "s/step":
            return f"{value:.3g}"
        if column.startswith("Δm"):
            return f"{value:+.2f}"
        return f"{value:.4f}"
    return str(value)


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A Markdown table of cells already written as text ('|' in a cell is escaped)."""
    def line(cells):
        return "| " + " | ".join(str(text).replace("|", "\\|") for text in cells) + " |"
    return "\n".join([line(columns), "|" + "|".join("---" for _ in columns) + "|", *map(line, rows)])


def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(column for row in rows for column in row))
    return markdown_table(columns, [[cell(column, row.get(column)) for column in columns] for row in rows])
