"""`mtmm-cache`: what mtmm keeps in its cache folder, and removing what runs no longer use.

    mtmm-cache                                   # list: generated datasets, decoded images, frozen-encoder features
    mtmm-cache prune --unused-days 30 [--dry-run]

Every entry is named by what its contents depend on, so a changed dataset, transform or encoder makes a new one and
old ones are never used again; each run that reuses an entry marks it used (its modification time), which is what
`prune` goes by. Temp files left by a run killed while writing are removed by `prune` once a day old. Nothing
outside the patterns below is touched, whatever else the folder holds.
"""

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

KINDS = {"dataset": "shapes-*", "images": "images/*.u8", "features": "features/*.pt"}  # what mtmm writes
LEFTOVERS = (".shapes-tmp-*", "images/.*.tmp", "features/.*.tmp")  # temp files of a write that never finished
DAY = 86400.0


def mark_used(path: Path) -> None:
    """Called by a run that reuses a cache entry: `prune` removes entries by the time they were last used."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache folder: it cannot be pruned from here either
        pass


def default_root() -> Path:
    return Path(os.environ.get("MTMM_CACHE", "~/.cache/mtmm")).expanduser()


def size_of(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(file.stat().st_size for file in path.rglob("*") if file.is_file() and not file.is_symlink())
    return path.lstat().st_size


def entries(root: Path) -> list[tuple[str, Path, int, float]]:
    """(kind, path, bytes, last used as a timestamp) of every cache entry under `root`, oldest use first."""
    found = [(kind, path, size_of(path), path.lstat().st_mtime)
             for kind, pattern in KINDS.items() for path in root.glob(pattern)]
    return sorted(found, key=lambda entry: entry[3])


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtmm-cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None,
                        help="the cache folder (default: $MTMM_CACHE, else ~/.cache/mtmm)")
    commands = parser.add_subparsers(dest="command")
    prune = commands.add_parser("prune", help="remove entries not used for some days")
    prune.add_argument("--unused-days", type=float, required=True, metavar="DAYS",
                       help="remove entries no run has used for this many days (0: every entry)")
    prune.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    args = parser.parse_args(argv)
    root = (args.root or default_root()).expanduser()
    if not root.is_dir():
        print(f"{root}: no cache folder (nothing cached yet)")
        return 0
    now = time.time()
    if args.command is None:
        listed = entries(root)
        for kind, path, size, used in listed:
            print(f"{kind:<9} {human(size):>10}  used {(now - used) / DAY:6.1f} days ago  {path}")
        print(f"{len(listed)} entries, {human(sum(entry[2] for entry in listed))} in {root}")
        return 0
    if args.unused_days < 0:
        parser.error(f"--unused-days {args.unused_days:g}: use a number of days >= 0")
    doomed = [(path, size) for _, path, size, used in entries(root) if now - used >= args.unused_days * DAY]
    doomed += [(path, size_of(path)) for pattern in LEFTOVERS for path in root.glob(pattern)
               if now - path.lstat().st_mtime >= DAY]
    for path, size in doomed:
        print(f"{'would remove' if args.dry_run else 'removing'} {human(size):>10}  {path}")
        if not args.dry_run:
            remove(path)
    freed = human(sum(size for _, size in doomed))
    print(f"{len(doomed)} entries, {freed} {'would be freed' if args.dry_run else 'freed'} in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
