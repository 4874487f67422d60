"""What a run writes besides checkpoints: metrics.jsonl (one JSON object per event), summary.json, JSON files."""

import json
import math
import os
from pathlib import Path


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

    def __init__(self, path: Path, enabled: bool = True):
        self.file = path.open("a", encoding="utf-8") if enabled else None

    def write(self, **record) -> None:
        if self.file is not None:
            self.file.write(json.dumps(clean(record)) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def truncate_jsonl(path: Path, keep) -> None:
    """Keep the records for which keep(record) is true (and any half-written last line is dropped), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if keep(record):
            kept.append(line)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(temp, path)


def write_json(path: Path, data: dict) -> None:
    """Atomic: a reader never sees half a file."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(clean(data), indent=2) + "\n", encoding="utf-8")
    os.replace(temp, path)
