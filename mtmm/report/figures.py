"""The report's figures, each a PNG from the records of metrics.jsonl or a sweep's rows. Every function takes plain
data and a path and draws on a Figure of its own (not pyplot: no global state, no GUI backend)."""

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mtmm.atomic import write_atomically

WIDTH, HEIGHT = 5.2, 3.4  # one panel, in inches at 100 dpi


def panels(count: int, title: str, columns: int = 2):
    """A figure with `count` panels in rows of `columns`; the unused cells are left blank."""
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(WIDTH * columns, HEIGHT * rows + 0.4), dpi=100, layout="constrained")
    figure.suptitle(title)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_axis_off()
    return figure, list(axes[:count])


def save(figure: Figure, path: Path) -> Path:
    write_atomically(path, lambda file: figure.savefig(file, format="png"))
    return path


def numeric(value) -> float:
    """None (JSON's NaN) and anything not a number -> NaN, which matplotlib leaves as a gap in a line."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of the finite ones among the last `window` values at each point: the trend of a noisy per-step curve."""
    out, total, count = [], 0.0, 0
    for i, value in enumerate(values):
        if math.isfinite(value):
            total, count = total + value, count + 1
        if i >= window and math.isfinite(values[i - window]):
            total, count = total - values[i - window], count - 1
        out.append(total / count if count else math.nan)
    return out


def style(ax, xlabel: str, ylabel: str, title: str = "") -> None:
    if xlabel in ("step", "epoch"):  # whole numbers only: there is no step 2.5
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="0.9")
    ax.set_axisbelow(True)  # the grid behind bars and lines
    handles = ax.get_legend_handles_labels()[0]
    if handles:  # under the panel, where it hides no line (constrained layout makes the room)
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=min(4, len(handles)),
                  frameon=False)


def plot_steps(ax, steps: list[int], series: dict[str, list[float]], smooth: bool = False) -> None:
    """One line per series over the steps; with `smooth` a thin raw line under a running mean once there are
    enough steps for the noise to hide the trend."""
    window = max(1, len(steps) // 50)
    for n, (name, values) in enumerate(series.items()):
        if smooth and window > 1:
            ax.plot(steps, values, color=f"C{n}", linewidth=0.7, alpha=0.35)
            ax.plot(steps, running_mean(values, window), color=f"C{n}", linewidth=1.8,
                    label=f"{name} (mean of {window} steps)")
        else:
            ax.plot(steps, values, color=f"C{n}", linewidth=1.5, marker="." if len(steps) <= 50 else None,
                    label=name)


def training_loss(train: list[dict], tasks: list[str], path: Path) -> Path:
    """Each task's loss and the total (weighted) loss over the optimizer steps."""
    steps = [record["step"] for record in train]
    figure, (per_task, total) = panels(2, "training loss")
    plot_steps(per_task, steps, {task: [numeric((r.get(task) or {}).get("loss")) for r in train] for task in tasks},
               smooth=True)
    style(per_task, "step", "loss", "per task (unweighted)")
    plot_steps(total, steps, {"total": [numeric(r.get("loss")) for r in train]}, smooth=True)
    style(total, "step", "loss", "total (what the optimizer minimises)")
    return save(figure, path)


def validation(val: list[dict], tasks: list[str], best_epoch, path: Path) -> Path:
    """Per task, its metrics per epoch (one panel each; the validation losses share one more panel), with the best
    epoch (summary.json's, by trainer.monitor) as a dashed line."""
    epochs = [record["epoch"] for record in val]
    figure, axes = panels(len(tasks) + 1, "validation metrics per epoch")
    for ax, task in zip(axes, tasks):
        names = [name for name in (val[-1].get(task) or {}) if name not in ("loss", "count")]
        for n, name in enumerate(names):
            ax.plot(epochs, [numeric((r.get(task) or {}).get(name)) for r in val], color=f"C{n}", marker="o",
                    label=name)
        mark_best(ax, best_epoch)
        style(ax, "epoch", "value", task)
    for n, task in enumerate(tasks):
        axes[-1].plot(epochs, [numeric((r.get(task) or {}).get("loss")) for r in val], color=f"C{n}",
                      marker="o", label=task)
    mark_best(axes[-1], best_epoch)
    style(axes[-1], "epoch", "loss", "validation loss")
    return save(figure, path)


def mark_best(ax, best_epoch) -> None:
    if isinstance(best_epoch, int):
        ax.axvline(best_epoch, color="0.3", linestyle="--", linewidth=1, label=f"best (epoch {best_epoch})")


def task_weights(train: list[dict], path: Path) -> Path:
    """The weight the loss-weighting method gave each task at each logged step."""
    steps = [record["step"] for record in train]
    tasks = list(dict.fromkeys(task for record in train for task in (record.get("weights") or {})))
    figure, (ax,) = panels(1, "task weights")
    plot_steps(ax, steps, {task: [numeric((r.get("weights") or {}).get(task)) for r in train] for task in tasks})
    style(ax, "step", "weight")
    return save(figure, path)


def learning_rate(train: list[dict], path: Path) -> Path:
    figure, (ax,) = panels(1, "learning rate")
    plot_steps(ax, [record["step"] for record in train], {"lr": [numeric(record.get("lr")) for record in train]})
    style(ax, "step", "learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return save(figure, path)


def conflict(records: list[dict], path: Path) -> Path:
    """The cosine of every pair of tasks' gradients (below 0: a step for one raises the other's loss) and each
    task's gradient norm, at the steps where trainer.log_conflict_every measured them."""
    steps = [record["step"] for record in records]
    pairs = list(dict.fromkeys(pair for record in records for pair in (record.get("cosine") or {})))
    tasks = list(dict.fromkeys(task for record in records for task in (record.get("norms") or {})))
    figure, (cosine, norms) = panels(2, "gradient conflict on the shared layers")
    plot_steps(cosine, steps, {pair.replace("~", " vs "): [numeric((r.get("cosine") or {}).get(pair))
                                                         for r in records] for pair in pairs})
    cosine.axhline(0, color="0.3", linewidth=1)
    cosine.set_ylim(-1.05, 1.05)
    style(cosine, "step", "cosine of the gradients", "below 0: the tasks conflict")
    plot_steps(norms, steps, {task: [numeric((r.get("norms") or {}).get(task)) for r in records] for task in tasks})
    style(norms, "step", "gradient norm", "per task")
    return save(figure, path)


def sweep_bars(names: list[str], columns: list[str], rows: list[dict], time_column: str | None, path: Path) -> Path:
    """Per task a panel of grouped bars, one group per job and one bar per metric; the time per step last."""
    tasks = list(dict.fromkeys(column.split("/")[0] for column in columns))
    figure, axes = panels(len(tasks) + (time_column is not None), "test metrics per job", columns=2)
    positions = range(len(names))
    for ax, task in zip(axes, tasks):
        metrics = [column for column in columns if column.split("/")[0] == task]
        width = 0.8 / len(metrics)
        for n, column in enumerate(metrics):
            ax.bar([p - 0.4 + width * (n + 0.5) for p in positions], [numeric(row[column]) for row in rows],
                   width, color=f"C{n}", label=column.split("/")[1])
        ax.set_xticks(list(positions), names)
        style(ax, "job", "value", task)
    if time_column is not None:
        axes[-1].bar(list(positions), [numeric(row[time_column]) for row in rows], 0.6, color="0.5")
        axes[-1].set_xticks(list(positions), names)
        style(axes[-1], "job", "seconds", "time per optimizer step")
    return save(figure, path)


def pareto_scatter(names: list[str], points: list[tuple], front: list[int], labels: tuple[str, str],
                   path: Path) -> Path:
    """Each job at its two tasks' metrics; the Pareto front ringed and joined."""
    figure, (ax,) = panels(1, "each job's two tasks against each other")
    xs, ys = [numeric(x) for x, _ in points], [numeric(y) for _, y in points]
    ax.scatter(xs, ys, color="C0", zorder=2, label="job")
    for name, x, y in zip(names, xs, ys):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize="small")
    chosen = sorted(front, key=lambda i: xs[i])
    ax.plot([xs[i] for i in chosen], [ys[i] for i in chosen], color="C3", linestyle="--", marker="o",
            markersize=11, markerfacecolor="none", zorder=3, label="Pareto front")
    style(ax, labels[0], labels[1])
    return save(figure, path)
