"""The one way mtmm replaces a file: write a temp file beside it, fsync, rename over it. A crash mid-write leaves
the previous file intact, never half a file; a full disk is one line that says so."""

import errno
import os
import shutil
import tempfile
from pathlib import Path

from mtmm.errors import UserError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def write_atomically(path: Path, write) -> None:
    """write(file) into a temp file in the same folder (named `.<name>.<random>.tmp`, which the next start of a run
    removes if a kill left it behind), fsync, then rename over `path`. The file gets the user's umask, like any file
    they write: tempfile alone would make it private (0600), unreadable to the teammates the user shares with."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~current_umask())
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException as error:
        Path(temp).unlink(missing_ok=True)
        if disk_full(error):
            raise UserError(disk_full_message(path, "write")) from None
        raise


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda file: file.write(text.encode("utf-8")))


def link_atomically(source: Path, path: Path) -> None:
    """Make `path` a second name of the file `source` (a hard link: no bytes written), replacing `path` atomically.
    Every write replaces a name with a new file and never changes a file's bytes, so a later save of either name
    leaves the other as it was. Where hard links are not supported, the file is copied (atomically)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.link.tmp")
    temp.unlink(missing_ok=True)
    try:
        os.link(source, temp)
    except OSError:
        with open(source, "rb") as original:
            write_atomically(path, lambda file: shutil.copyfileobj(original, file))
        return
    try:
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (os.umask can only set and return)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def disk_full(error: BaseException) -> bool:
    """An OSError of a full disk or quota; torch's own file writer reports it as a RuntimeError 'file write failed'."""
    if isinstance(error, OSError):
        return error.errno in DISK_FULL
    return isinstance(error, RuntimeError) and "file write failed" in str(error)


def disk_full_message(path: Path, action: str) -> str:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    kept = f"the previous {path.name} is intact" if path.exists() else f"no earlier {path.name} existed"
    return f"cannot {action} {path}: the disk is full ({free} there); {kept}. Free some space and run again"
