"""The names and marks of cache entries: what an entry's contents depend on, hashed into its name, and the 'last
used' stamp that `mtmm-cache prune` goes by."""

import hashlib
import json
import os
from pathlib import Path


def mark_used(path: Path) -> None:
    """Called by a run that reuses a cache entry: `prune` removes entries by the time they were last used."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache folder: it cannot be pruned from here either
        pass


def samples_digest(dataset, modality: str, pad: int) -> str:
    """sha256 of a split's (a ManifestDataset's) inputs to one modality, in order: image files (path, size, mtime)
    and the transform, or the token ids themselves (which cover the texts, the tokenizer and max_length)."""
    if modality == "image":
        files = [None if path is None else [str(path), file_stamp(path)] for path in dataset.image_paths]
        inputs = {"transform": repr(dataset.transform), "images": files}
    else:
        inputs = {"pad_id": pad, "input_ids": dataset.input_ids, "has_text": dataset.has_text}
    return hashlib.sha256(json.dumps({"ids": dataset.ids, **inputs}).encode()).hexdigest()


def file_stamp(path: Path) -> tuple[int, int] | None:
    """(size, mtime) of an image file; None for a missing one (data.check_images=false let it through: decoding it
    then fails, naming the manifest line)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns
