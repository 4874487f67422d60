"""data=hf: a Hugging Face `datasets` dataset (a save_to_disk folder, a Dataset or a DatasetDict), Parquet files or
Arrow files, read through `datasets` as memory-mapped Arrow tables: a batch reads its rows from the mapped file, so
start-up and memory do not grow with the number of rows (nothing is copied into Python records).

Columns are mapped as a manifest's are (data.source.columns); the image column holds the `Image` feature (encoded
bytes) or paths relative to image_root. Splits: a DatasetDict's by name (train; val, valid, validation or dev;
test), files given per split, a split column, or a seeded random hold-out of train, as for manifests.
"""

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
from torch.utils.data import Dataset

from mtmm.data.rows import WHERE, BadRows, build_batch, check_sample
from mtmm.data.sources import hold_out
from mtmm.errors import UserError
from mtmm.hub import offline

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}


@dataclass
class TableSource:
    tables: dict[str, datasets.Dataset]  # split -> its rows (memory-mapped Arrow)
    files: dict[str, str]  # split -> what it was read from (named in messages)
    image_root: Path | None  # relative image paths start here
    columns: dict[str, str]  # mtmm's name (image, text, id) -> the table's column
    fingerprint: str  # changes when the data does (keys the cache of learnt labels)
    cache_dir: str | None  # where learnt labels and converted Parquet files are kept
    check_sample: int  # rows of each split parsed and decoded before training


def hf(path: str, val: str | None = None, test: str | None = None, split_column: str | None = None,
       val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0, image_root: str | None = None,
       columns: dict | None = None, cache_dir: str | None = None, check_sample: int = 32) -> TableSource:
    """The splits of `path` (and of `val` / `test` when given), as memory-mapped tables."""
    offline()
    columns = {"image": "image", "text": "text", "id": "id", **(columns or {})}
    found = open_tables(path, cache_dir)
    files = {split: path for split in found}
    if "train" not in found:
        raise UserError(f"data.source.path={path}: no split named train (it has {sorted(found)}); name the "
                        f"training split train, or give a Dataset rather than a DatasetDict")
    for split, other in (("val", val), ("test", test)):
        if other is not None:
            found[split] = open_tables(other, cache_dir)["train"]
            files[split] = other
    if split_column is not None:
        found, files = by_split_column(found["train"], path, split_column)
    missing = [split for split in ("val", "test") if split not in found]
    if missing:
        found.update(random_split(found, missing, {"val": val_fraction, "test": test_fraction}, split_seed, path))
        files.update({split: path for split in missing})
    root = Path(image_root).expanduser() if image_root else (Path(path).parent if Path(path).is_file() else
                                                            Path(path))
    fingerprint = hashlib.sha256(" ".join(f"{split}:{table._fingerprint}:{len(table)}"
                                          for split, table in sorted(found.items())).encode()).hexdigest()
    return TableSource(found, files, root, columns, fingerprint, cache_dir, check_sample)


def open_tables(path: str, cache_dir: str | None) -> dict[str, datasets.Dataset]:
    """split -> table of a save_to_disk folder, a .parquet / .arrow file, or a folder of such files."""
    where = Path(path).expanduser()
    if not where.exists():
        raise UserError(f"data.source.path={path} does not exist; give a folder written by save_to_disk, a "
                        f".parquet or .arrow file, or a folder of them")
    try:
        if where.is_dir() and ((where / "dataset_dict.json").is_file() or (where / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(where))
            tables = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
            named = {SPLIT_NAMES[split.lower()]: table for split, table in tables.items()
                     if split.lower() in SPLIT_NAMES}
            others = sorted(split for split in tables if split.lower() not in SPLIT_NAMES)
            if others:  # e.g. imdb's `unsupervised`: not one of the three a run uses
                log.info("%s: splits %s are not used (only train, val/valid/validation/dev and test are)", path, others)
            return named
        files = sorted(where.glob("*.parquet")) + sorted(where.glob("*.arrow")) if where.is_dir() else [where]
        kinds = {file.suffix.lower() for file in files}
        if not files or not kinds <= {".parquet", ".arrow"} or len(kinds) > 1:
            raise UserError(f"data.source.path={path}: expected a save_to_disk folder (dataset_dict.json or "
                            f"state.json), .parquet files or .arrow files (one kind), found {sorted(kinds) or 'none'}")
        if kinds == {".arrow"}:  # memory-mapped as they are
            return {"train": datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])}
        # Parquet is compressed: converted once into an Arrow file under cache_dir, which is then memory-mapped.
        cache = str(Path(cache_dir).expanduser() / "hf") if cache_dir else None
        return {"train": datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=cache)}
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as error:
        raise UserError(f"data.source.path={path}: cannot be read as a dataset: {str(error).splitlines()[0]}") from None


def by_split_column(table: datasets.Dataset, path: str, column: str) -> tuple[dict, dict]:
    """Rows per split, by the split named in `column` (read as one Arrow column, never as records)."""
    if column not in table.column_names:
        raise UserError(f"{path}: data.source.split_column={column!r} but the table has no such column; it has "
                        f"{table.column_names}")
    values = table.data.column(column).to_pylist()  # one column: a list of short strings
    rows = {"train": [], "val": [], "test": []}
    for row, value in enumerate(values):
        split = SPLIT_NAMES.get(str(value or "").strip().lower())
        if split is None:
            raise UserError(f"{path}, row {row}, column {column!r}: split {value!r} is not one of train, val (valid, "
                            f"validation, dev), test")
        rows[split].append(row)
    empty = [split for split, indices in rows.items() if not indices]
    if empty:
        raise UserError(f"{path}: no row has split {' or '.join(empty)} in column {column!r}")
    return {split: table.select(indices) for split, indices in rows.items()}, {split: path for split in rows}


def random_split(tables: dict, missing: list[str], fractions: dict, seed: int, path: str) -> dict:
    """Move a seeded random fraction of the training rows into each missing split (the manifests' rule, same seed,
    same split); the tables keep their file order (an index mapping, no copy)."""
    held, kept = hold_out(len(tables["train"]), missing, fractions, seed, path)
    result = {split: tables["train"].select(indices) for split, indices in held.items()}
    tables["train"] = tables["train"].select(kept)
    return result


class TableDataset(Dataset):
    """One split of a TableSource. A batch reads its rows from the table, then parses, decodes and tokenises them
    (rows.build_batch); only `check_sample` rows are checked before training."""

    def __init__(self, source: TableSource, split: str, tasks, transform, tokenizer, max_length: int,
                 on_bad_sample: str, augment=None):
        self.split, self.file, self.tasks, self.transform = split, source.files[split], tasks, transform
        self.tokenizer, self.max_length, self.augment, self.side = tokenizer, max_length, augment, None
        self.image_root, self.bad = source.image_root, BadRows(on_bad_sample)
        table = source.tables[split]
        wanted = {"text": tokenizer is not None, "image": transform is not None, "id": False}
        self.columns = table_columns(table, source.columns, tasks, wanted, self.file)
        table = table.select_columns(list(self.columns.values()))
        image = self.columns.get("image")
        if image is not None and isinstance(table.features[image], datasets.Image):
            table = table.cast_column(image, datasets.Image(decode=False))  # raw bytes; decoded by our transform
        self.table = table
        self.image_shape = check_sample(self.rows(range(min(source.check_sample, len(table)))), tasks, self.bad,
                                        transform, self.image_root)
        self.ids = Column(self, "id")
        self.targets = {task.name: Labelled(self, task.target) for task in tasks}

    @property
    def skipped(self) -> int:
        return self.bad.skipped

    def __len__(self) -> int:
        return len(self.table)

    def rows(self, indices) -> list[dict]:
        """Rows `indices` as dicts of mtmm's names (image, text, id, task targets) with WHERE."""
        indices = list(indices)
        cells = self.table[indices] if indices else {}
        rows = []
        for k, index in enumerate(indices):
            row = {ours: cells[theirs][k] for ours, theirs in self.columns.items()}
            image = row.get("image")
            if isinstance(image, dict):  # the Image feature: bytes, or a path when stored by reference
                row["image"] = image.get("bytes") or image.get("path")
            row[WHERE] = f"{self.file} ({self.split}), row {index}"
            rows.append(row)
        return rows

    def __getitems__(self, indices: list) -> dict:
        epochs = None
        if len(indices) and isinstance(indices[0], tuple):  # (epoch, index) from EpochShuffle(with_epoch)
            epochs, indices = [epoch for epoch, _ in indices], [index for _, index in indices]
        return build_batch(self.rows(indices), indices, self.tasks, self.bad, transform=self.transform,
                           image_root=self.image_root, tokenizer=self.tokenizer, max_length=self.max_length,
                           image_size=self.image_shape, augment=self.augment, side=self.side, epochs=epochs)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])


def table_columns(table: datasets.Dataset, columns: dict, tasks, wanted: dict, where: str) -> dict[str, str]:
    """mtmm's name -> the table's column; a needed column the table lacks is an error listing those it has."""
    have = table.column_names
    mapped = {}
    needed = [(ours, columns[ours], f"map yours with data.source.columns.{ours}=COLUMN")
              for ours in ("image", "text", "id") if ours in columns]
    needed += [(task.target, task.target, f"the target of task {task.name!r}; set tasks.{task.name}.target")
               for task in tasks]
    for ours, theirs, hint in needed:
        if theirs in have:
            mapped[ours] = theirs
        elif wanted.get(ours, ours not in ("image", "text", "id")):
            raise UserError(f"{where}: no column {theirs!r} ({hint}); the table has {have}")
    return mapped


class Column:
    """A column read on demand (`dataset.ids[i]`, as evaluation writes predictions); the row number without one."""

    def __init__(self, dataset: TableDataset, name: str):
        self.dataset, self.name = dataset, name

    def __getitem__(self, index: int):
        if self.name not in self.dataset.columns:
            return str(index)
        return str(self.dataset.table[int(index)][self.dataset.columns[self.name]])

    def __len__(self) -> int:
        return len(self.dataset)


class Labelled:
    """Per row, None where the target cell is empty (else True): what summary.json counts as labelled samples,
    streamed from the one Arrow column."""

    def __init__(self, dataset: TableDataset, column: str):
        self.dataset, self.column = dataset, column

    def __iter__(self):
        table = self.dataset.table.select_columns([self.column]).with_format("arrow")
        for chunk in table.iter(batch_size=65536):
            for value in chunk.column(0).to_pylist():
                yield None if value is None or value == "" else True

    def __len__(self) -> int:
        return len(self.dataset)


def streamed_rows(table: datasets.Dataset, columns: dict, targets: list[str]):
    """The training split's label and text cells, in chunks (what vocab.learnt learns from)."""
    wanted = [target for target in targets if target in table.column_names]
    text = columns.get("text") if columns.get("text") in table.column_names else None
    names = sorted(set(wanted + ([text] if text else [])))

    def rows():
        view = table.select_columns(names).with_format("arrow")
        for chunk in view.iter(batch_size=65536):
            cells = {name: chunk.column(name).to_pylist() for name in names}
            for k in range(chunk.num_rows):
                row = {name: cells[name][k] for name in wanted}
                if text:
                    row["text"] = cells[text][k]
                yield row

    return rows
