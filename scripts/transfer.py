"""Does a task with few labels gain from related, fully labelled tasks? Single-task vs multi-task, side by side.

The scarce task keeps only a share of its training labels (data.source.label_fraction); the multi-task model
(tasks=img+size+tags) also trains the other two image tasks on every sample. The default scarce task is `size`
(the radius): `tags` holds coarse bins of the same radius (large >= 16 px, small <= 13 px) and the shape `img`
sets how much of the disc is filled. Both arms see the same images, the same scarce labels and the same steps;
best.pt is chosen on the scarce task's validation metric (val and test keep every label). Every task reads the
image only, so the text encoder is left out.

    python scripts/transfer.py [--scarce size|img|tags] [--fractions 0.05 0.1] [--seeds 0 1 2] [--train 2000]
        [--epochs 12] [--image-size 64] [--losses static uncertainty] [--out DIR] [-- more mtmm-train overrides]

Prints a Markdown table: per setting the scarce task's test metrics (mean ± std over the seeds) alone and in the
multi-task model, and Δm over those metrics (of the means, mean ± std of the per-seed Δm, and of the last epoch's
means). Run folders already in --out are reused, not trained again.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_module

from mtmm.report.delta_m import delta_m
from mtmm.train import train

MULTI = "img+size+tags"
# The scarce task's metrics (Δm averages over them) and the one, with its direction, that picks best.pt.
SCARCE = {"size": (["mae", "rmse"], "mae", "min"), "img": (["accuracy", "macro_f1"], "accuracy", "max"),
          "tags": (["micro_f1", "macro_f1"], "micro_f1", "max")}
# Every task here reads the image only: no text encoder.
COMMON = ["encoder/text=none", "device=cpu", "trainer.progress=false"]


def run_one(out: Path, name: str, overrides: list[str]) -> tuple[dict, float, dict]:
    """Train one model into out/name (reused when its summary.json is there); -> (test metrics of best.pt, wall
    seconds, test metrics of the last epoch)."""
    folder = out / name
    summary = folder / "summary.json"
    if not summary.exists():
        with initialize_config_module("mtmm.conf", version_base="1.3"):
            cfg = compose("train", overrides=[*COMMON, *overrides])
        train(cfg, run_dir=folder)
    result = json.loads(summary.read_text())
    return result["best"]["test"], result["wall_time_s"], result["final"]["test"]


def mean_std(values: list[float], digits: int = 3) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scarce", default="size", choices=sorted(SCARCE), help="the task with few labels")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05],
                        help="shares of the scarce task's labels kept")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--train", type=int, default=2000, help="training samples")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=64, help="side of the generated images, pixels")
    parser.add_argument("--losses", nargs="+", default=["static"], help="weightings of the multi-task arm")
    parser.add_argument("--out", type=Path, default=None, help="run folders go here (default: a temp folder)")
    parser.add_argument("extra", nargs="*", help="more mtmm-train overrides for every run (after --)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="mtmm-transfer-"))
    metrics, monitor, mode = SCARCE[args.scarce]
    data = [f"trainer.monitor=val/{args.scarce}/{monitor}", f"trainer.monitor_mode={mode}",
            f"data.source.train={args.train}", "data.source.val=500", "data.source.test=500",
            f"data.source.image_size={args.image_size}", f"trainer.epochs={args.epochs}", *args.extra]
    rows, started = [], time.perf_counter()
    for fraction in args.fractions:
        labels = [f"data.source.label_fraction={{{args.scarce}:{fraction}}}", *data]
        single = {seed: run_one(out, f"{args.scarce}/f{fraction}/single/s{seed}",
                                [f"tasks={args.scarce}", f"seed={seed}", *labels])
                  for seed in args.seeds}
        for loss in args.losses:
            multi = {seed: run_one(out, f"{args.scarce}/f{fraction}/{loss}/s{seed}",
                                   [f"tasks={MULTI}", f"loss={loss}", f"seed={seed}", *labels])
                     for seed in args.seeds}
            rows.append(row(args.scarce, metrics, fraction, round(fraction * args.train), loss, single, multi))
    print(f"\n{args.train} training samples, {args.image_size} px, {args.epochs} epochs, seeds {args.seeds}; "
          f"test split, best checkpoint by val/{args.scarce}/{monitor}; total wall time "
          f"{time.perf_counter() - started:.0f} s; run folders in {out}\n")
    columns = [f"{args.scarce} {m}: single | multi" for m in metrics]
    print(f"| {args.scarce} labels | runs | " + " | ".join(columns)
          + " | Δm % (of means) | Δm % per seed | Δm %, last epoch | s/run single, multi |")
    print("|---|---|" + "---|---|" * len(metrics) + "---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def mean_of(runs: dict, task: str, metrics: list[str], which: int) -> dict:
    """{task: {metric: mean over the seeds}} of the best (which=0) or last-epoch (which=2) test metrics."""
    return {task: {m: statistics.mean(run[which][task][m] for run in runs.values()) for m in metrics}}


def row(task: str, metrics: list[str], fraction: float, count: int, loss: str, single: dict, multi: dict) -> list[str]:
    """One table row: the scarce task's metrics alone and in the multi-task model (mean ± std), and Δm."""
    cells = [f"{fraction:.0%} ({count})", f"`tasks={task}` vs `tasks={MULTI}`, loss={loss}"]
    for metric in metrics:
        cells += [mean_std([single[s][0][task][metric] for s in single]),
                  mean_std([multi[s][0][task][metric] for s in multi])]
    chosen = {task: metrics}
    paired = [delta_m({task: multi[s][0][task]}, {task: single[s][0][task]}, chosen) for s in single]
    seconds = [statistics.mean(run[1] for run in arm.values()) for arm in (single, multi)]
    return cells + [f"{delta_m(mean_of(multi, task, metrics, 0), mean_of(single, task, metrics, 0), chosen):+.1f}",
                    mean_std(paired, 1),
                    f"{delta_m(mean_of(multi, task, metrics, 2), mean_of(single, task, metrics, 2), chosen):+.1f}",
                    f"{seconds[0]:.0f}, {seconds[1]:.0f}"]


if __name__ == "__main__":
    sys.exit(main())
