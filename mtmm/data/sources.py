"""Where a dataset's samples are: records per split (dicts with `image`, `text`, `id` and one column per task)
and the folder that relative image paths start from. One function per kind of source, chosen by `_target_`."""

import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mtmm.data.readers import LINE, columns_of, read_manifest
from mtmm.data.shapes import prepare_shapes
from mtmm.errors import UserError

SPLITS = ("train", "val", "test")


@dataclass
class DataSource:
    records: dict[str, list[dict]]  # split -> records, each with its line number under readers.LINE
    files: dict[str, Path]  # split -> the file its records came from (named in error messages)
    image_root: Path  # relative image paths are relative to this folder


# The manifest fields that hold a label, and the shipped tasks (conf/task/) that read them under another name.
SHAPES_LABELS = ("shape", "colour", "sentiment", "match", "size", "tags")
SHAPES_TASK_FIELDS = {"img": "shape", "txt": "sentiment"}


def shapes(cache_dir: str, seed: int = 0, image_size: int = 64, train: int = 4000, val: int = 500, test: int = 500,
           background: str = "grey", label_fraction: Mapping | None = None) -> DataSource:
    """The embedded `shapes` dataset, generated into cache_dir on first use; `label_fraction` keeps only a share
    of the training labels of some fields (the rest become "no label"), see keep_label_fraction."""
    fractions = label_fractions(label_fraction, train)  # checked before anything is generated
    folder = prepare_shapes(cache_dir, seed=seed, image_size=image_size, train=train, val=val, test=test,
                            background=background)
    files = {split: folder / f"{split}.jsonl" for split in SPLITS}
    records = {split: read_manifest(path) for split, path in files.items()}
    records["train"] = keep_label_fraction(records["train"], fractions, seed)
    return DataSource(records, files, folder)


def label_fractions(label_fraction: Mapping | None, train_count: int) -> dict[str, float]:
    """{task or field: share} from the config -> {manifest field: share in (0, 1]}, or a one-line UserError."""
    if label_fraction is not None and not isinstance(label_fraction, Mapping):
        raise UserError(f"data.source.label_fraction={label_fraction!r}: give a mapping of task or field to share, "
                        f"e.g. data.source.label_fraction={{img:0.05}}")
    fields = {}
    for key, share in (label_fraction or {}).items():
        field = SHAPES_TASK_FIELDS.get(key, key)
        if field not in SHAPES_LABELS:
            raise UserError(f"data.source.label_fraction.{key}: not a label of the shapes data; use a task "
                            f"({', '.join(f'{task} = {name}' for task, name in SHAPES_TASK_FIELDS.items())}) or a "
                            f"field ({', '.join(SHAPES_LABELS)})")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise UserError(f"data.source.label_fraction.{key}={share!r}: give the share of training samples that "
                            f"keep the label, a number in (0, 1], e.g. 0.05")
        if round(share * train_count) < 1 and train_count:
            raise UserError(f"data.source.label_fraction.{key}={share!r} keeps no label of the {train_count} training "
                            f"samples; give at least {1 / train_count:.2g}")
        if field in fields:
            raise UserError(f"data.source.label_fraction names field {field!r} twice ({key!r} and an alias)")
        fields[field] = float(share)
    return fields


def keep_label_fraction(records: list[dict], fractions: dict[str, float], seed: int) -> list[dict]:
    """Keep each field's label on round(share x N) training records, chosen at random (seeded by the generation
    seed and the field, so the same config always labels the same samples); the others lose it (None: no label,
    masked out of that task's loss). Other fields, and the val/test splits, keep every label."""
    if not fractions:
        return records
    records = [dict(record) for record in records]  # the caller's manifest rows stay as read
    for field, share in sorted(fractions.items()):
        keep = set(random.Random(f"{seed}/label_fraction/{field}").sample(range(len(records)),
                                                                           round(share * len(records))))
        for index, record in enumerate(records):
            if index not in keep:
                record[field] = None
    return records


def manifest(train: str, val: str | None = None, test: str | None = None, split_column: str | None = None,
             val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0,
             image_root: str | None = None, columns: dict | None = None) -> DataSource:
    """Your own data: a CSV, TSV or JSONL file per split; or one file with a split column; or one file split at
    random (seeded) into train/val/test. `columns` maps mtmm's names (image, text, id) to the file's columns."""
    train_path = Path(train).expanduser()
    records = {"train": rename_columns(read_manifest(train_path), columns or {}, train_path)}
    files = {"train": train_path}
    if split_column is not None:
        records, files = by_split_column(records["train"], train_path, split_column)
    else:
        for split, path in (("val", val), ("test", test)):
            if path is not None:
                files[split] = Path(path).expanduser()
                records[split] = rename_columns(read_manifest(files[split]), columns or {}, files[split])
        missing = [split for split in ("val", "test") if split not in records]
        if missing:
            records.update(random_split(records, missing, {"val": val_fraction, "test": test_fraction}, split_seed,
                                        train_path))
            files.update({split: train_path for split in missing})
    return DataSource(records, files, existing_image_root(image_root) if image_root else train_path.parent)


def existing_image_root(image_root: str) -> Path:
    """The configured image folder; a missing one is one error naming the option, not one per image."""
    folder = Path(image_root).expanduser()
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"data.source.image_root={image_root!r} {problem}; relative image paths start there "
                        f"(null: the folder of the train manifest)")
    return folder


def rename_columns(records: list[dict], columns: dict, path: Path) -> list[dict]:
    """Map the file's column names to mtmm's (image, text, id)."""
    renames = {theirs: ours for ours, theirs in columns.items() if theirs and theirs != ours}
    if not renames:
        return records
    present = columns_of(records)
    for theirs, ours in renames.items():
        if theirs not in present:
            raise UserError(f"{path}: data.source.columns.{ours}={theirs!r} but the file has no such column; "
                            f"it has {sorted(present)}")
    # A file column already named like one of mtmm's (an `image` column beside the mapped `img_path`) gives way
    # to the mapped one, whatever the column order.
    shadowed = set(renames.values()) - set(renames)
    return [{renames.get(key, key): value for key, value in record.items() if key not in shadowed}
            for record in records]


def by_split_column(records: list[dict], path: Path, column: str) -> tuple[dict, dict]:
    names = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}
    split_records = {split: [] for split in SPLITS}
    for record in records:
        value = str(record.get(column) or "").strip().lower()
        if value not in names:
            raise UserError(f"{path}, line {record[LINE]}, column {column!r}: split {record.get(column)!r} is not one "
                            f"of train, val (valid, validation, dev), test")
        split_records[names[value]].append(record)
    empty = [split for split, rows in split_records.items() if not rows]
    if empty:
        raise UserError(f"{path}: no row has split {' or '.join(empty)} in column {column!r}")
    return split_records, {split: path for split in SPLITS}


def random_split(records: dict, missing: list[str], fractions: dict, seed: int, path: Path) -> dict:
    """Move a seeded random fraction of the training rows into each missing split (same seed, same split)."""
    held, kept = hold_out(len(records["train"]), missing, fractions, seed, path)
    rows = records["train"]
    records["train"] = [rows[i] for i in kept]
    return {split: [rows[i] for i in indices] for split, indices in held.items()}


def hold_out(count: int, missing: list[str], fractions: dict, seed: int, path) -> tuple[dict, list[int]]:
    """({split: the row indices it takes}, the indices training keeps), each in file order: a seeded shuffle of the
    training rows, each missing split taking its fraction in turn (same seed, same split, whatever the source)."""
    rows = list(range(count))
    random.Random(seed).shuffle(rows)
    taken, held = 0, {}
    for split in missing:
        size = round(fractions[split] * count)
        if size < 1:
            raise UserError(f"{path}: {count} rows are too few to hold out a {split} split of "
                            f"{fractions[split]:.0%}; give data.source.{split}=FILE")
        held[split] = sorted(rows[taken: taken + size])
        taken += size
    return held, sorted(rows[taken:])
