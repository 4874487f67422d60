"""The report of one training run: its summary tables, training and validation curves, task weights, learning
rate, gradient conflict (when trainer.log_conflict_every logged it) and robustness curves (when a robustness.json
from `mtmm-eval ... robustness=true` is given or lies in the run folder)."""

from pathlib import Path

from mtmm.errors import UserError
from mtmm.report import figures
from mtmm.report.delta_m import baseline_metrics, run_delta_m
from mtmm.report.read import read_json, read_jsonl
from mtmm.report.sweep import MISSING, cell, config_value, find_runs, read_run, seconds_per_step, task_metrics


def run_report(folder: Path, out: Path, baselines: str | None = None, robustness: str | None = None,
               split: str = "test", which: str = "best") -> tuple[str, list[tuple]]:
    """(title, blocks) of the report of the run in `folder`; the figures are written to `out`."""
    if not (folder / "summary.json").is_file():
        raise UserError(f"cannot read {folder / 'summary.json'}: there is no such file (mtmm-train writes it when "
                        f"the run ends: this run has not finished, or it stopped early)")
    run = read_run(folder)
    records = read_jsonl(folder / "metrics.jsonl")
    summary = run["summary"]
    tasks = list(task_metrics(run)) or [task for task in (summary.get("best") or {}).get("test") or {}
                                         if task != "mean"]
    train = [r for r in records if r.get("split") == "train" and isinstance(r.get("step"), int)]
    val = [r for r in records if r.get("split") == "val" and isinstance(r.get("epoch"), int)]
    measured = [r for r in records if r.get("split") == "conflict" and isinstance(r.get("step"), int)]

    blocks = [("heading", "Summary"), ("table", ["", "value"], facts(run, tasks))]
    if baselines is not None:
        blocks.append(("text", delta_m_line(run, baselines, split, which)))
    blocks += [("heading", "Test metrics of the last and the best checkpoint"), test_table(summary, tasks)]

    blocks.append(("heading", "Training"))
    if not train:
        blocks.append(("text", f"{folder / 'metrics.jsonl'} holds no training records (split: train)."))
    else:
        figures.training_loss(train, tasks, out / "loss.png")
        blocks.append(("figure", "loss.png", "training loss per task and in total, per optimizer step"))
        if any(r.get("weights") for r in train):
            figures.task_weights(train, out / "weights.png")
            blocks.append(("figure", "weights.png", "the weight of each task's loss, per step"))
        if any(isinstance(r.get("lr"), (int, float)) for r in train):
            figures.learning_rate(train, out / "lr.png")
            blocks.append(("figure", "lr.png", "learning rate per step"))
    if val:
        figures.validation(val, tasks, (summary.get("best") or {}).get("epoch"), out / "val.png")
        monitor = summary.get("monitor", "trainer.monitor")
        blocks += [("heading", "Validation"),
                   ("figure", "val.png", f"validation metrics per epoch; dashed: the best epoch by {monitor}")]
    if measured or summary.get("gradient_conflict"):
        blocks.append(("heading", "Gradient conflict"))
    if measured:
        figures.conflict(measured, out / "conflict.png")
        blocks.append(("figure", "conflict.png", "cosine of each pair of tasks' gradients and each task's gradient "
                                                 "norm"))
    if summary.get("gradient_conflict"):
        blocks.append(conflict_table(summary["gradient_conflict"]))
    robustness_file = Path(robustness) if robustness is not None else folder / "robustness.json"
    if robustness is not None or robustness_file.is_file():
        blocks += robustness_blocks(robustness_file, out)
    return f"mtmm run {folder.resolve().name}", blocks


def facts(run: dict, tasks: list[str]) -> list[list[str]]:
    """What the run was and how it went, as (name, value) rows."""
    summary, config = run["summary"], run["config"]
    best = summary.get("best") or {}
    seconds = seconds_per_step(run)
    rows = [["tasks", " ".join(tasks)], ["loss weighting", config_value(config, "loss")],
            ["fusion", config_value(config, "fusion")], ["overrides", " ".join(run["overrides"]) or MISSING],
            ["monitor", f"{summary.get('monitor', MISSING)} = {cell('value', summary.get('monitor_value'))}"],
            ["best epoch", f"{best.get('epoch', MISSING)} of {(summary.get('final') or {}).get('epoch', MISSING)}"],
            ["optimizer steps", str(run["steps"] or MISSING)],
            ["wall time", f"{summary['wall_time_s']} s" if "wall_time_s" in summary else MISSING],
            ["s/step", cell("s/step", seconds)]]
    samples = summary.get("samples")
    if isinstance(samples, dict):
        rows.append(["samples", ", ".join(f"{split} {count}" for split, count in samples.items())])
    return rows


def test_table(summary: dict, tasks: list[str]) -> tuple:
    """Every task's test metrics (and their mean over tasks) of last.pt and best.pt, as summary.json holds them."""
    final, best = summary.get("final") or {}, summary.get("best") or {}
    last_test, best_test = final.get("test") or {}, best.get("test") or {}
    columns = ["task", "metric", f"last (epoch {final.get('epoch', MISSING)})",
               f"best (epoch {best.get('epoch', MISSING)})"]
    rows = []
    for task in dict.fromkeys([*tasks, *last_test, *best_test]):
        names = dict.fromkeys([*(last_test.get(task) or {}), *(best_test.get(task) or {})])
        rows += [[task, name, cell(name, (last_test.get(task) or {}).get(name)),
                  cell(name, (best_test.get(task) or {}).get(name))] for name in names if name != "count"]
    return ("table", columns, rows)


def conflict_table(summary: dict) -> tuple:
    rows = [[pair.replace("~", " vs "), str(s.get("logged_steps", MISSING)), cell("share", s.get("conflict_share")),
             cell("cosine", s.get("mean_cosine")), cell("ratio", s.get("mean_norm_ratio"))]
            for pair, s in summary.items()]
    return ("table", ["task pair", "logged steps", "share conflicting (cos < 0)", "mean cosine",
                      "mean norm ratio"], rows)


def delta_m_line(run: dict, baselines: str, split: str, which: str) -> str:
    found = baseline_metrics([read_run(path) for path in find_runs([baselines])], split, which)
    value, tasks = run_delta_m(run, {task: values for task, (values, _) in found.items()}, split, which)
    return (f"Δm against the single-task baselines in {baselines}: {value:+.2f} % "
            f"(primary metrics of {', '.join(tasks)}; {split} split, {which} checkpoints)")


def robustness_blocks(path: Path, out: Path) -> list[tuple]:
    """The robustness figure and each task's primary metric clean, with a modality missing, and as the relative
    area under each corruption's curve (1 = unaffected)."""
    from mtmm.robustness import plot_curves  # here: it pulls in torch, which the rest of the report does not need
    if path.is_dir():
        path = path / "robustness.json"
    result = read_json(path)
    missing = [key for key in ("primary", "clean", "missing", "corruptions") if not isinstance(result.get(key), dict)]
    if missing:
        raise UserError(f"{path} is not a robustness.json of mtmm-eval ... robustness=true (no {', '.join(missing)})")
    try:
        plot_curves(result, out / "robustness.png")
        rows = [[task, metric, cell(metric, result["clean"][task][metric]),
                 *(cell(metric, values[task][metric]) for values in result["missing"].values()),
                 *(cell(metric, curve["relative"][task][metric]) for curve in result["corruptions"].values())]
                for task, metric in result["primary"].items()]
    except (KeyError, TypeError, IndexError) as error:
        raise UserError(f"{path} is not a robustness.json of mtmm-eval ... robustness=true ({error!r} is missing "
                        f"or malformed)") from None
    columns = ["task", "metric", "clean", *(f"{m} missing" for m in result["missing"]),
               *(f"{kind} (relative AUC)" for kind in result["corruptions"])]
    return [("heading", f"Robustness ({result.get('split', 'test')} split)"),
            ("figure", "robustness.png", f"primary metric per corruption level, from {path}"),
            ("table", columns, rows)]
