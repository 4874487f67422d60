"""What a run learns from the training split before its first step (class names, regression statistics, the
tokenizer's vocabulary), for sources too large to hold as records: learnt from one streamed pass over the label
and text columns only, and cached under the source's cache_dir, keyed by the data's fingerprint and the config
that shapes the result, so a second run on the same data starts without any pass."""

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from mtmm.atomic import write_text_atomically
from mtmm.build import has_encoder, instantiate
from mtmm.data.readers import FILE
from mtmm.data.tokenizer import tokenizer_from_files, tokenizer_to_files
from mtmm.tasks import TaskSpec, build_tasks

log = logging.getLogger(__name__)

VERSION = 1  # bump when what the cache holds changes
CHUNK = 65_536  # rows per kept Arrow array


class Streamed:
    """A re-iterable view of the training rows with only the cells learning needs: build_tasks and a tokenizer
    builder iterate it as they would a list of records. `keep`: the first complete pass also keeps those cells,
    as JSON text in Arrow arrays (compact: no Python object per row), and later iterations read them instead of
    the data again, so that learning several tasks and a vocabulary is still one pass over the files."""

    def __init__(self, rows: Callable[[], Iterator[dict]], size: int | Callable[[], int], where: str,
                 fields: list[str] | None = None):
        self.rows, self.size, self.where, self.fields = rows, size, where, fields
        self.kept: list[pa.Array] | None = None

    def __iter__(self):
        if self.kept is not None:
            for chunk in self.kept:
                for text in chunk.to_pylist():
                    yield {**json.loads(text), FILE: self.where}
            return
        chunks, pending = [], []
        for row in self.rows():
            if self.fields is not None:
                pending.append(json.dumps({field: row[field] for field in self.fields if field in row}))
                if len(pending) == CHUNK:
                    chunks.append(pa.array(pending, type=pa.string()))
                    pending = []
            row[FILE] = self.where  # what tasks.source_of names in its messages
            yield row
        if self.fields is not None:
            self.kept = chunks + [pa.array(pending, type=pa.string())]

    def __len__(self) -> int:
        return self.size() if callable(self.size) else self.size  # a callable: counted when first asked


class Texts:
    """The training texts of a Streamed view (what train_wordpiece counts words of)."""

    def __init__(self, rows: Streamed):
        self.rows = rows

    def __iter__(self):
        for row in self.rows:
            yield str(row.get("text") or "")

    def __len__(self) -> int:
        return len(self.rows)


def learnt(cfg: DictConfig, fingerprint: str, rows: Streamed, cache_dir: str | None
           ) -> tuple[list[TaskSpec], object | None]:
    """TaskSpecs and the tokenizer, from the cache when this data and config were seen before, else learnt from
    `rows` and cached."""
    text = has_encoder(cfg, "text")
    key = hashlib.sha256(json.dumps({
        "version": VERSION, "data": fingerprint, "tasks": OmegaConf.to_container(cfg.tasks, resolve=True),
        "tokenizer": OmegaConf.to_container(cfg.encoder.text.tokenizer, resolve=True) if text else None,
    }, sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir).expanduser() / "learnt" / f"{key}.json" if cache_dir else None
    if path is not None and path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        log.info("labels and vocabulary of %s from the cache %s (no pass over the data)", rows.where, path)
        tokenizer = tokenizer_from_files(saved["tokenizer_files"], str(path)) if text else None
        return build_tasks(cfg, None, saved), tokenizer
    tasks = build_tasks(cfg, rows)
    tokenizer = None
    if text:
        tokenizer = instantiate(cfg.encoder.text.tokenizer, texts=Texts(rows))
    if path is not None:
        saved = {"classes": {task.name: list(task.classes) for task in tasks},
                 "stats": {task.name: [task.mean, task.std] for task in tasks},
                 "tokenizer_files": tokenizer_to_files(tokenizer) if tokenizer is not None else None}
        write_text_atomically(path, json.dumps(saved))
    return tasks, tokenizer
