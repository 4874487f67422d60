"""`mtmm-cache`: what mtmm keeps in its cache folder, and removing what runs no longer use.

    mtmm-cache                                   # list: generated datasets, decoded images, frozen-encoder features
    mtmm-cache prune --unused-days 30 [--dry-run]

Every entry is named by what its contents depend on, so a changed dataset, transform or encoder makes a new one and
old ones are never used again; each run that reuses an entry marks it used (its modification time), which is what
`prune` goes by. Temp files left by a run killed while writing are removed by `prune` once a day old.

Only what mtmm made is listed or removed: a name that matches the patterns below proves nothing, so each entry must
also carry the mark its writer gives it (a generated dataset's dataset.json, a decoded-image file's header, a
feature file's contents), and a temp file must be named exactly as mtmm names them. Anything else (a user's file or
folder, a symlink, whatever is behind one) is listed as not mtmm's and left alone.
"""

import argparse
import os
import re
import shutil
import sys
import time
from pathlib import Path

KINDS = {"dataset": "shapes-*", "images": "images/*.u8", "features": "features/*.pt"}  # where mtmm writes what
# The names mtmm gives them: shapes-<12 hex of the parameters>, <split>-<sha256>.u8, <split>-<modality>-<sha256>.pt.
NAMES = {"dataset": r"shapes-[0-9a-f]{12}", "images": r".+-[0-9a-f]{64}\.u8", "features": r".+-[0-9a-f]{64}\.pt"}
RANDOM = "[a-z0-9_]{8}"  # what tempfile's mkdtemp/mkstemp put in a name
# Temp files of a write that never finished, named exactly as mtmm names them: the folder prepare_shapes generates
# into, and write_atomically's `.<entry name>.<random>.tmp` beside a decoded-image or feature file.
LEFTOVERS = {".shapes-tmp-*": rf"\.shapes-tmp-{RANDOM}",
             "images/.*.tmp": rf"\.{NAMES['images']}\.{RANDOM}\.tmp",
             "features/.*.tmp": rf"\.{NAMES['features']}\.{RANDOM}\.tmp"}
DAY = 86400.0


def default_root() -> Path:
    return Path(os.environ.get("MTMM_CACHE", "~/.cache/mtmm")).expanduser()


def size_of(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(file.stat().st_size for file in path.rglob("*") if file.is_file() and not file.is_symlink())
    return path.lstat().st_size


def candidates(root: Path, pattern: str) -> list[Path]:
    """What `pattern` matches under `root`. A symlinked `images/` or `features/` is not looked into (it leads out of
    the cache root): the link itself is the one, foreign, candidate."""
    folder = root / Path(pattern).parent
    if folder != root and folder.is_symlink():
        return [folder]
    return sorted(folder.glob(Path(pattern).name))


def is_mtmm_entry(kind: str, path: Path) -> bool:
    """Whether `path` has the name mtmm gives an entry of this kind and the mark its writer puts in it."""
    if path.is_symlink() or not re.fullmatch(NAMES[kind], path.name):
        return False
    # Imported here: they import torch (seconds), which listing an empty cache needs not.
    if kind == "dataset":
        from mtmm.data.shapes import is_generated
        return is_generated(path)
    if kind == "images":
        from mtmm.cache.images import is_cache_file
        return is_cache_file(path)
    from mtmm.cache.features import is_cache_file
    return is_cache_file(path)


def is_leftover(pattern: str, path: Path) -> bool:
    """A temp folder (of a dataset) or file named exactly as mtmm names them; never a symlink."""
    if path.is_symlink() or not re.fullmatch(LEFTOVERS[pattern], path.name):
        return False
    return path.is_dir() if pattern.startswith(".shapes-tmp-") else path.is_file()


def entries(root: Path) -> tuple[list[tuple[str, Path, int, float]], list[Path]]:
    """(kind, path, bytes, last used as a timestamp) of every cache entry mtmm made under `root`, oldest use first;
    and the paths named like entries that mtmm did not make (left alone)."""
    found, others = [], []
    for kind, pattern in KINDS.items():
        for path in candidates(root, pattern):
            if is_mtmm_entry(kind, path):
                found.append((kind, path, size_of(path), path.lstat().st_mtime))
            else:
                others.append(path)
    return sorted(found, key=lambda entry: entry[3]), others


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
        listed, others = entries(root)
        for kind, path, size, used in listed:
            print(f"{kind:<9} {human(size):>10}  used {(now - used) / DAY:6.1f} days ago  {path}")
        for path in others:  # said, so that a user sees why prune keeps them
            print(f"{'-':<9} {'-':>10}  not mtmm's, left alone  {path}")
        print(f"{len(listed)} entries, {human(sum(entry[2] for entry in listed))} in {root}")
        return 0
    if args.unused_days < 0:
        parser.error(f"--unused-days {args.unused_days:g}: use a number of days >= 0")
    doomed = [(path, size) for _, path, size, used in entries(root)[0] if now - used >= args.unused_days * DAY]
    doomed += [(path, size_of(path)) for pattern in LEFTOVERS for path in candidates(root, pattern)
               if is_leftover(pattern, path) and now - path.lstat().st_mtime >= DAY]
    for path, size in doomed:
        print(f"{'would remove' if args.dry_run else 'removing'} {human(size):>10}  {path}")
        if not args.dry_run:
            remove(path)
    freed = human(sum(size for _, size in doomed))
    print(f"{len(doomed)} entries, {freed} {'would be freed' if args.dry_run else 'freed'} in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
