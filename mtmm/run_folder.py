"""Which folder a run may write into, one process at a time, and what a killed run left behind there.

mtmm writes only into folders it created (or found empty): it marks each with a `.mtmm-run` file when it starts
one, and that file is also the lock a running process holds, so a second process started in the same folder stops
at once instead of interleaving its records with the first's. Hydra's own files (`.hydra/`, `<job>.log`), which
Hydra writes before mtmm's code runs, are the only foreign files a folder may already hold.
"""

import fcntl
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from mtmm.errors import UserError, exit_with

MARKER = ".mtmm-run"
HYDRA_FILES = frozenset({".hydra", "train.log", "eval.log", "predict.log"})
# What a training run writes: a folder holding one of these holds a run (with or without a checkpoint yet).
RUN_FILES = ("config.yaml", "checkpoints", "metrics.jsonl")

_held: dict[Path, object] = {}  # run folder -> the open marker file whose lock this process holds


def claim(folder: Path, kind: str = "train", resuming: bool = False) -> None:
    """Make `folder` this process's `kind` ("train", "eval" or "predict") folder, or stop with one line saying why not: it holds
    files mtmm did not write, it already holds a run (unless `resuming` it), or another process is using it.
    Removes the temp files of writes that a kill interrupted. Held until `release` or the end of the process."""
    folder = Path(folder).resolve()  # one key per folder, however it was spelled (a second lock would block)
    if folder in _held:
        return
    names = refuse_foreign(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = (folder / MARKER).open("a+", encoding="utf-8")
    try:
        fcntl.flock(marker, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        marker.seek(0)
        owner = marker.read().strip()
        marker.close()
        raise UserError(f"{folder} is in use by another mtmm process ({owner or 'unknown'}); wait for it to end or "
                        f"pick another folder with hydra.run.dir=...") from None
    try:
        previous = recorded_kind(folder, marker)
        if previous is not None and previous != kind:
            raise UserError(f"{folder} is an mtmm {previous} folder; a {kind} needs its own (hydra.run.dir=...)")
        if kind == "train" and not resuming and any(name in names for name in RUN_FILES):
            raise UserError(f"{folder} already holds a run; mtmm never overwrites one. Continue it with "
                            f"resume={folder}, or pick another folder with hydra.run.dir=...")
        if (kind == "eval" and "metrics.json" in names) or (kind == "predict" and "predictions.csv" in names):
            raise UserError(f"{folder} already holds an mtmm {kind} run; pick another folder with hydra.run.dir=...")
    except UserError:
        marker.close()
        raise
    marker.seek(0)
    marker.truncate()
    marker.write(json.dumps({"kind": kind, "pid": os.getpid(), "host": os.uname().nodename}) + "\n")
    marker.flush()
    _held[folder] = marker
    remove_leftovers(folder)


def refuse_foreign(folder: Path) -> set[str]:
    """Stop unless `folder` is new, empty, holds only Hydra's files, or is mtmm's; returns the names it holds."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder; pick a run folder with hydra.run.dir=...")
    names = {entry.name for entry in folder.iterdir()} if folder.is_dir() else set()
    mine = MARKER in names or is_unmarked_run(folder)
    if not mine and names - HYDRA_FILES:
        foreign = sorted(names - HYDRA_FILES)
        raise UserError(f"{folder} holds files mtmm did not write ({', '.join(foreign[:5])}"
                        f"{', ...' if len(foreign) > 5 else ''}); mtmm never writes into such a folder. Pick a new "
                        f"or empty one with hydra.run.dir=...")
    return names


def refuse_foreign_run_dir_argument(argv: list[str]) -> None:
    """Before Hydra writes its files into a folder named with hydra.run.dir= on the command line: may mtmm use it?"""
    for argument in argv[1:]:
        if argument.startswith("hydra.run.dir=") and "${" not in argument:
            refuse_foreign(Path(argument.split("=", 1)[1]).expanduser())


def start_command(hydra_main) -> None:
    """The body of a command's main(): check a hydra.run.dir= folder first, then let Hydra run the command."""
    try:
        refuse_foreign_run_dir_argument(sys.argv)
    except UserError as error:
        exit_with(error)
    hydra_main()


def discard_if_only_hydra(folder: Path, since: float) -> None:
    """Remove `folder` when it holds nothing but what Hydra (and the lock) wrote there since `since`: what a command
    that stopped before doing anything leaves. Anything else in it, or older, stays."""
    if not folder.is_dir() or folder.resolve() in _held:
        return
    entries = list(folder.iterdir())
    if any(entry.name not in HYDRA_FILES | {MARKER} or entry.is_symlink() for entry in entries):
        return
    files = [path for entry in entries for path in ([entry] if entry.is_file() else entry.rglob("*"))]
    if any(path.is_symlink() or not (path.is_file() or path.is_dir()) or path.lstat().st_mtime < since - 1
           for path in files):
        return
    root = logging.getLogger()
    for handler in list(root.handlers):  # Hydra's file handler holds <job>.log open (and would make it again)
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == folder.resolve():
            root.removeHandler(handler)
            handler.close()
    shutil.rmtree(folder)


def release(folder: Path) -> None:
    marker = _held.pop(Path(folder).resolve(), None)
    if marker is not None:
        marker.close()  # closing the file drops the lock


def recorded_kind(folder: Path, marker) -> str | None:
    marker.seek(0)
    try:
        return json.loads(marker.read() or "null").get("kind")
    except (json.JSONDecodeError, AttributeError):
        return "train" if is_unmarked_run(folder) else None


def is_unmarked_run(folder: Path) -> bool:
    """A training run folder written before run folders were marked: its config.yaml and checkpoints/."""
    return (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir()


def holds_run(folder: Path) -> bool:
    """An mtmm training run folder (marked, or from before marking) with the resolved config it was started with."""
    return (folder / "config.yaml").is_file() and ((folder / MARKER).is_file() or is_unmarked_run(folder))


def remove_leftovers(folder: Path) -> None:
    """The temp files of atomic writes (`.<name>.<random>.tmp`, see atomic.py) that a kill left behind: with the
    folder locked, no write of ours is in progress there."""
    for place in (folder, folder / "checkpoints"):
        if place.is_dir():
            for path in place.glob(".*.tmp"):
                if path.is_file() and not path.is_symlink():
                    path.unlink()
