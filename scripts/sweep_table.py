"""One Markdown row per run of one or more sweeps: each task's primary metric, mean accuracy, seconds per step.

    python scripts/sweep_table.py multirun/2025-01-01/12-00-00 [MORE_DIRS...] [--split test] [--which best|final]
        [--by loss,fusion] [--baseline loss=static] [--json]

A run is a folder with summary.json (mtmm-train writes it last, so a crashed run is not listed). Rows are named by
the overrides that differ between runs (.hydra/overrides.yaml), or with --by by config values read from config.yaml
(`--by loss` prints the method, e.g. pcgrad or uncertainty; `--by fusion` the class, e.g. LateFusion).
"""

import argparse
import json
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

MISSING = "–"


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def find_runs(dirs: list[str]) -> list[Path]:
    """Every folder with a summary.json at or below each dir, in the order a person would list them (job 10 after 9)."""
    runs = []
    for given in map(Path, dirs):
        if not given.is_dir():
            fail(f"{given} is not a folder")
        found = sorted((path.parent for path in given.rglob("summary.json")), key=lambda path: [
            int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))])
        if not found:
            fail(f"no runs under {given} (no summary.json in it or below it)")
        runs += [path for path in found if path not in runs]
    return runs


def read_run(folder: Path) -> dict:
    """summary.json, config.yaml, the overrides and the number of optimizer steps of one run folder."""
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        fail(f"cannot read {folder / 'summary.json'}: {error}")
    try:
        config = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"))
    except Exception as error:  # OSError or any YAML parse error
        fail(f"cannot read {folder / 'config.yaml'}: {error}")
    overrides_file, metrics_file, steps = folder / ".hydra" / "overrides.yaml", folder / "metrics.jsonl", None
    try:
        overrides = [str(item) for item in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
        if metrics_file.is_file():  # validation records carry the step count too, whatever trainer.log_every was
            records = [json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines() if line]
            steps = max((record.get("step") or 0 for record in records), default=0) or None
    except Exception as error:  # OSError, YAML or JSON errors
        fail(f"cannot read {overrides_file} or {metrics_file}: {error}")
    return {"folder": folder, "summary": summary, "config": config, "overrides": overrides, "steps": steps}


def split_metrics(run: dict, which: str, split: str) -> dict:
    """{task: {metric: value}} of summary.json's `which` (best or final) checkpoint on `split`."""
    try:
        return run["summary"][which][split]
    except (KeyError, TypeError):
        fail(f"{run['folder'] / 'summary.json'} has no {which}.{split} metrics")


def primary_metrics(run: dict) -> dict[str, str]:
    """task -> the first metric listed in its config (what the run reports first)."""
    tasks = run["config"].get("tasks") or {}
    return {task: spec["metrics"][0] for task, spec in tasks.items() if spec.get("metrics")}


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


def run_names(runs: list[dict]) -> list[str]:
    """Each run's overrides that are not shared by every run (all of them when there is only one run)."""
    shared = set.intersection(*(set(run["overrides"]) for run in runs)) if len(runs) > 1 else set()
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
    return wall / run["steps"] if wall is not None and run["steps"] else None


def build_rows(runs: list[dict], split: str, which: str, by: list[str], baseline: str | None) -> list[dict]:
    names = run_names(runs)
    columns = list(dict.fromkeys(f"{task}/{metric}" for run in runs for task, metric in primary_metrics(run).items()))
    if any("accuracy" in (split_metrics(run, which, split).get("mean") or {}) for run in runs):
        columns.append("mean/accuracy")
    if baseline is not None:
        key, _, value = baseline.partition("=")
        baselines = [run for run in runs if value and is_baseline(run, key, value)]
        if not baselines:
            fail(f"--baseline {baseline}: no run matches; use KEY=VALUE as in the runs' overrides, e.g. loss=static")
    rows = []
    for run, name in zip(runs, names):
        metrics = split_metrics(run, which, split)
        row = {key: config_value(run["config"], key) for key in by} if by else {"run": name}
        for column in columns:
            task, metric = column.split("/")
            row[column] = (metrics.get(task) or {}).get(metric)
        row["s/step"] = seconds_per_step(run)
        if baseline is not None:
            base = pick_baseline(run, baselines, key)
            base_time = seconds_per_step(base) if base is not None else None
            row[f"× {value}"] = row["s/step"] / base_time if row["s/step"] is not None and base_time else None
        row["folder"] = str(run["folder"])
        rows.append(row)
    return rows


def cell(column: str, value) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.2f}×" if column.startswith("×") else f"{value:.3g}" if column == "s/step" else f"{value:.4f}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(column for row in rows for column in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(column, row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", help="sweep folders (multirun/<date>/<time>) or run folders")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--which", default="best", choices=["best", "final"], help="best.pt or the last epoch")
    parser.add_argument("--by", default="", help="name rows by these config keys, e.g. loss,fusion")
    parser.add_argument("--baseline", help="KEY=VALUE of the run the time per step is compared with, e.g. loss=static")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    runs = [read_run(folder) for folder in find_runs(args.dirs)]
    rows = build_rows(runs, args.split, args.which, [key for key in args.by.split(",") if key], args.baseline)
    print(json.dumps(rows, indent=2, ensure_ascii=False) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
