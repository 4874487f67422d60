"""mtmm-report: figures and one self-contained page about a run or a sweep.

    mtmm-report outputs/<date>/<time>              a run: report.html and its PNGs, written into the run folder
    mtmm-report multirun/<date>/<time>             a sweep: one row per job, bars per task, a Pareto front
        [format=html|md]       md: report.md with Markdown tables and relative image links (to paste)
        [out=DIR]              write there instead: a new or empty folder, or one an earlier mtmm-report wrote
        [baselines=DIR]        single-task baseline runs (a sweep or run folders): adds Δm, as scripts/delta_m.py
        [tasks=A,B]            sweep: the two tasks of the Pareto scatter (default: the first two)
        [split=test|val] [which=best|final]      the metrics the tables and Δm use (default: test of best.pt)
        [robustness=FILE]      run: a robustness.json of mtmm-eval ... robustness=true (default: the run folder's)
"""

import sys
from pathlib import Path

from mtmm.errors import UserError, exit_with
from mtmm.report.page import write_html, write_markdown
from mtmm.run_folder import HYDRA_FILES, MARKER, holds_run

OPTIONS = {"format": "html", "out": None, "baselines": None, "tasks": None, "split": "test", "which": "best",
           "robustness": None}
CHOICES = {"format": ("html", "md"), "split": ("test", "val"), "which": ("best", "final")}
REPORT_MARKER = ".mtmm-report"  # in a folder mtmm-report made: a later report may write there again
USAGE = "mtmm-report RUN_OR_SWEEP_FOLDER [format=html|md] [out=DIR] [baselines=DIR] [tasks=A,B] [split=] [which=]"


def parse(argv: list[str]) -> tuple[Path, dict]:
    """The folder and the key=value options (Hydra-style, as the other mtmm commands take them)."""
    folders, options = [], dict(OPTIONS)
    for argument in argv:
        key, equals, value = argument.partition("=")
        if not equals or (key not in OPTIONS and Path(argument).exists()):
            folders.append(argument)
            continue
        if key not in OPTIONS:
            raise UserError(f"{argument}: unknown option {key!r}; use {', '.join(f'{k}=' for k in OPTIONS)}")
        if key in CHOICES and value not in CHOICES[key]:
            raise UserError(f"{argument}: use {key}={' or '.join(CHOICES[key])}")
        options[key] = value
    if len(folders) != 1:
        raise UserError(f"give one run or sweep folder ({len(folders)} given): {USAGE}")
    return Path(folders[0]).expanduser(), options


def kind_of(folder: Path) -> str:
    """'run' (a folder mtmm-train wrote into) or 'sweep' (a folder with runs below it)."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; give a run folder (outputs/<date>/<time>) or a sweep folder "
                        f"(multirun/<date>/<time>)")
    if (folder / "metrics.json").is_file() and not (folder / "summary.json").exists():
        raise UserError(f"{folder} is an mtmm-eval folder, not a run; report the run it evaluated and add "
                        f"robustness={folder / 'robustness.json'}")
    if any((folder / name).exists() for name in ("summary.json", "metrics.jsonl", "config.yaml", MARKER)):
        return "run"
    if next(folder.rglob("summary.json"), None) is not None:
        return "sweep"
    raise UserError(f"{folder} is neither a run folder (summary.json, metrics.jsonl) nor a sweep folder (job "
                    f"folders 0/, 1/, ... with a summary.json each); give one that mtmm-train wrote")


def output_folder(folder: Path, kind: str, out: str | None) -> Path:
    """Where the report goes: the run or sweep folder itself, or out=DIR; never a folder mtmm did not make."""
    if out is None:
        if kind == "run" and not holds_run(folder):
            raise UserError(f"{folder} has no {MARKER} or checkpoints/: mtmm-train did not write it, so mtmm-report "
                            f"does not write into it either; give out=DIR (a new or empty folder)")
        if kind == "sweep":
            if not made_by_mtmm(folder):
                raise UserError(f"{folder} holds files that are not mtmm runs; give out=DIR (a new or empty folder)")
            (folder / REPORT_MARKER).touch()  # the report's own files beside the jobs do not count as foreign
        return folder
    target = Path(out).expanduser()
    if target.exists() and not target.is_dir():
        raise UserError(f"out={out} is a file; give a new or empty folder")
    if target.is_dir() and target.resolve() == folder.resolve():
        return output_folder(folder, kind, None)
    if target.is_dir():
        names = sorted(entry.name for entry in target.iterdir())
        if names and REPORT_MARKER not in names:
            raise UserError(f"out={out} holds files mtmm did not write ({', '.join(names[:5])}"
                            f"{', ...' if len(names) > 5 else ''}); give a new or empty folder")
    target.mkdir(parents=True, exist_ok=True)
    (target / REPORT_MARKER).touch()
    return target


def made_by_mtmm(sweep: Path) -> bool:
    """A Hydra multirun folder of mtmm-train: job folders that hold runs, Hydra's multirun.yaml, earlier reports."""
    for entry in sweep.iterdir():
        if entry.name in ("multirun.yaml", REPORT_MARKER, ".hydra"):
            continue
        if entry.is_dir() and (holds_run(entry) or next(entry.rglob(MARKER), None) is not None
                               or {item.name for item in entry.iterdir()} <= HYDRA_FILES):  # a job that never began
            continue
        if entry.is_file() and (sweep / REPORT_MARKER).is_file():  # what an earlier report wrote here
            continue
        return False
    return True


def report(folder: Path, options: dict) -> Path:
    """Write the report of the run or sweep in `folder`; returns the page's path."""
    from mtmm.report.run_report import run_report  # here: matplotlib loads only for good arguments
    from mtmm.report.sweep_report import sweep_report
    kind = kind_of(folder)
    if kind == "run" and options["tasks"] is not None:
        raise UserError(f"tasks= picks the two tasks of a sweep's scatter; {folder} is a run folder")
    if kind == "sweep" and options["robustness"] is not None:
        raise UserError(f"robustness= adds a run's robustness curves; {folder} is a sweep folder")
    out = output_folder(folder, kind, options["out"])
    if kind == "run":
        title, blocks = run_report(folder, out, options["baselines"], options["robustness"], options["split"],
                                   options["which"])
    else:
        title, blocks = sweep_report(folder, out, options["baselines"], options["tasks"], options["split"],
                                     options["which"])
    if options["format"] == "md":
        return write_markdown(out / "report.md", title, folder.resolve(), blocks)
    return write_html(out / "report.html", title, folder.resolve(), blocks)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(argument in ("-h", "--help") for argument in argv):
        print(__doc__)
        return
    try:
        path = report(*parse(argv))
    except UserError as error:
        exit_with(error)
    print(f"report: {path}")


if __name__ == "__main__":
    main()
