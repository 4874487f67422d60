"""One Markdown row per run of one or more sweeps: each task's primary metric, mean accuracy, seconds per step.

    python scripts/sweep_table.py multirun/2025-01-01/12-00-00 [MORE_DIRS...] [--split test] [--which best|final]
        [--by loss,fusion] [--baseline loss=static] [--json]

A run is a folder with summary.json (mtmm-train writes it last, so a crashed run is not listed). Rows are named by
the overrides that differ between runs (.hydra/overrides.yaml), or with --by by config values read from config.yaml
(`--by loss` prints the method, e.g. pcgrad or uncertainty; `--by fusion` the class, e.g. LateFusion).
The work is done by mtmm/report/sweep.py, which `mtmm-report SWEEP_DIR` uses too.
"""

import argparse
import json

from mtmm.errors import UserError, exit_with
# config_value is not used here: tests/test_scripts.py imports it from this script
from mtmm.report.sweep import build_rows, config_value, find_runs, markdown, read_run  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", help="sweep folders (multirun/<date>/<time>) or run folders")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--which", default="best", choices=["best", "final"], help="best.pt or the last epoch")
    parser.add_argument("--by", default="", help="name rows by these config keys, e.g. loss,fusion")
    parser.add_argument("--baseline", help="KEY=VALUE of the run the time per step is compared with, e.g. loss=static")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    try:
        runs = [read_run(folder) for folder in find_runs(args.dirs)]
        rows = build_rows(runs, args.split, args.which, [key for key in args.by.split(",") if key], args.baseline)
    except UserError as error:
        exit_with(error)
    print(json.dumps(rows, indent=2, ensure_ascii=False) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
