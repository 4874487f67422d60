"""What a run writes besides checkpoints: metrics.jsonl (one JSON object per event), summary.json, JSON files."""

import json
import math
from pathlib import Path

from mtmm.atomic import disk_full, write_text_atomically
from mtmm.errors import UserError


def clean(value):
    """JSON has no NaN: write null instead (e.g. AUROC of a split with one class)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(item) for item in value]
    return value


class MetricsLog:
    """Appends one JSON object per line and flushes, so a killed run keeps every record written so far.
    Disabled (enabled=False) on the processes of a distributed run other than rank 0."""

    def __init__(self, path: Path, enabled: bool = True, trackers: list | None = None):
        self.path = path
        self.trackers = list(trackers or []) if enabled else []  # mtmm/loggers: fed the same records
        self.file = path.open("a", encoding="utf-8") if enabled else None
        # Lines in the file: a checkpoint stores it, and resuming from that checkpoint keeps exactly those lines.
        self.lines = count_lines(path) if enabled else 0

    def write(self, **record) -> None:
        if self.file is None:
            return
        record = clean(record)
        for tracker in self.trackers:
            tracker.log(record, self.lines)
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as error:
            if not disk_full(error):
                raise
            raise UserError(f"cannot append to {self.path}: the disk is full; the checkpoints are intact. Free some "
                            f"space and continue with mtmm-train resume={self.path.parent}") from None
        self.lines += 1

    def finish(self, summary: dict) -> None:
        """The run's end: the trackers note the best checkpoint (and what else summary.json says)."""
        for tracker in self.trackers:
            tracker.finish(summary)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
        if self.file is not None:
            self.file.close()
            self.file = None


def count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open("rb") as file:
        return sum(1 for _ in file)


def truncate_jsonl(path: Path, keep=lambda record: True, lines: int | None = None) -> None:
    """Keep the first `lines` lines (all when None) and of those the records for which keep(record) is true; a
    half-written line (cut short by a kill) is dropped. Atomic."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines()[:lines]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if keep(record):
            kept.append(line)
    write_text_atomically(path, "".join(line + "\n" for line in kept))


def write_json(path: Path, data: dict) -> None:
    """Atomic: a reader never sees half a file."""
    write_text_atomically(path, json.dumps(clean(data), indent=2) + "\n")
