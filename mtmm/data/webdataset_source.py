"""data=webdataset: tar shards of samples (`{key}.jpg|png` + `{key}.json` and/or `{key}.txt`), streamed through the
`webdataset` library's tar readers, never listed as records.

Each shard is indexed once (its samples' header offsets, read from the tar headers without reading the images,
tar_index.py) and the index cached, so an epoch has a known length (a fixed number of steps on every rank) and a
batch seeks straight to its samples. How an epoch is shared among ranks and loader workers: shard_loader.py.
"""

import hashlib
import json
import random
import tarfile
from bisect import bisect_right
from dataclasses import dataclass
from glob import glob
from itertools import islice
from pathlib import Path

import numpy as np
from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_iterator

from mtmm.atomic import write_text_atomically
from mtmm.data.rows import BAD, WHERE, BadRows, build_batch, check_sample
from mtmm.data.tar_index import tar_members
from mtmm.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class ShardSource:
    shards: dict[str, list[Path]]  # split -> its shard files, sorted
    offsets: dict[Path, np.ndarray]  # shard -> byte offset of each sample's first tar header (see indexed)
    columns: dict  # image: member extensions tried in order; text, id: keys of the .json member
    fingerprint: str  # changes when a training shard does (keys the cache of learnt labels)
    cache_dir: str | None
    check_sample: int  # samples of each split parsed and decoded before training


def webdataset(train, val=None, test=None, val_fraction: float = 0.1, test_fraction: float = 0.1,
               split_seed: int = 0, columns: dict | None = None, cache_dir: str | None = None,
               check_sample: int = 32) -> ShardSource:
    """The shards of each split (a brace pattern, a glob, a folder of .tar files, or a list of them)."""
    columns = {"image": list(IMAGE_EXTENSIONS), "text": "text", "id": "id", **(columns or {})}
    if isinstance(columns["image"], str):
        columns["image"] = [columns["image"]]
    shards = {"train": shard_files(train, "train")}
    for split, spec in (("val", val), ("test", test)):
        if spec is not None:
            shards[split] = shard_files(spec, split)
    missing = [split for split in ("val", "test") if split not in shards]
    if missing:  # whole shards are held out: a seeded choice, as manifests hold out rows
        order = list(shards["train"])
        random.Random(split_seed).shuffle(order)
        for split in missing:
            count = round({"val": val_fraction, "test": test_fraction}[split] * len(shards["train"]))
            if count < 1 or count >= len(order):
                raise UserError(f"data.source.train: {len(shards['train'])} shards are too few to hold out a {split} "
                                f"split of {({'val': val_fraction, 'test': test_fraction}[split]):.0%} of the shards; "
                                f"give data.source.{split}=SHARDS")
            shards[split], order = sorted(order[:count]), order[count:]
        shards["train"] = sorted(order)
    fingerprint = hashlib.sha256(json.dumps([stamp(shard) for shard in shards["train"]]).encode()).hexdigest()
    return ShardSource(shards, {}, columns, fingerprint, cache_dir, check_sample)


def indexed(source: ShardSource, split: str) -> list[np.ndarray]:
    """The sample offsets of each of a split's shards, indexed when the split is first used (an evaluation of the
    test split indexes no training shard)."""
    for shard in source.shards[split]:
        if shard not in source.offsets:
            source.offsets[shard] = shard_offsets(shard, source.cache_dir)
    offsets = [source.offsets[shard] for shard in source.shards[split]]
    if not sum(len(o) for o in offsets):
        raise UserError(f"data.source.{split}: its shards {[str(f) for f in source.shards[split][:3]]} hold no samples")
    return offsets


def shard_files(spec, split: str) -> list[Path]:
    """A brace pattern (`data/train-{000..009}.tar`), a glob, a folder (its .tar files) or a list of those."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    files = []
    for item in specs:
        for name in braceexpand(str(item)):
            path = Path(name).expanduser()
            if path.is_dir():
                files += sorted(path.glob("*.tar"))
            elif any(char in name for char in "*?["):
                files += sorted(Path(found) for found in glob(str(path)))
            elif path.is_file():
                files.append(path)
            else:
                raise UserError(f"data.source.{split}: shard {name} does not exist")
    if not files:
        raise UserError(f"data.source.{split}={spec!r} names no shard; give .tar files, a folder of them or a "
                        f"pattern such as data/{split}-{{000..009}}.tar")
    return sorted(set(files))


def stamp(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def shard_offsets(path: Path, cache_dir: str | None) -> np.ndarray:
    """The byte offset of each sample's first tar header in `path`: from the cache, else read from the headers
    (seeking past the files' contents) and cached."""
    cached = index_file(path, cache_dir)
    if cached is not None and cached.is_file():
        return np.asarray(json.loads(cached.read_text())["offsets"], dtype=np.int64)
    with open(path, "rb") as file:  # uncompressed: a sample can then be read by seeking to it
        offsets = [offset for offset, _, _ in grouped(file, path)]
    return keep_index(path, offsets, cache_dir)


def index_file(path: Path, cache_dir: str | None) -> Path | None:
    key = hashlib.sha256(json.dumps(stamp(path)).encode()).hexdigest()
    return Path(cache_dir).expanduser() / "shard-index" / f"{key}.json" if cache_dir else None


def keep_index(path: Path, offsets: list[int], cache_dir: str | None) -> np.ndarray:
    cached = index_file(path, cache_dir)
    if cached is not None and not cached.is_file():
        write_text_atomically(cached, json.dumps({"offsets": offsets}))
    return np.asarray(offsets, dtype=np.int64)


def grouped(file, path: Path):
    """The samples of a tar file as webdataset groups its files (base_plus_ext; no key or __meta__ files left
    out): (offset of the sample's first header, key, extension -> tar_index.Member)."""
    current = None
    for member in tar_members(file, f"shard {path}"):
        prefix, extension = base_plus_ext(member.name)
        if prefix is None or member.name.startswith("__"):
            continue
        if current is None or prefix != current[1]:
            if current is not None:
                yield current
            current = (member.header, prefix, {})
        current[2][extension.lower()] = member
    if current is not None:
        yield current


def read_samples(path: Path, offset: int, count: int):
    """`count` consecutive samples of shard `path` from the one whose header is at `offset`, as webdataset groups
    a tar's files: {"__key__", "<extension>": bytes, ...}."""
    with open(path, "rb") as file:
        file.seek(offset)
        files = ({**entry, "__url__": str(path)} for entry in tar_file_iterator(file))
        try:
            yield from islice(group_by_keys(files), count)
        except (tarfile.TarError, OSError, ValueError) as error:
            raise UserError(f"shard {path}: cannot be read at byte {offset}: {error}") from None


def to_row(sample: dict, columns: dict, shard: Path) -> dict:
    """A webdataset sample -> a row (rows.py): the .json member's fields, the text of a .txt member, the image."""
    where = f"{shard}, key {sample['__key__']}"
    row = {WHERE: where}
    try:
        if "json" in sample:
            fields = json.loads(sample["json"])
            if not isinstance(fields, dict):
                raise UserError(f"{where}, member .json: expected a JSON object, got {type(fields).__name__}")
            row.update(fields)
        if "txt" in sample:
            row["text"] = sample["txt"].decode("utf-8")
        elif columns["text"] in row:
            row["text"] = row[columns["text"]]
        row["image"] = next((sample[ext] for ext in columns["image"] if ext in sample), None)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        row[BAD] = UserError(f"{where}, member .{'json' if 'json' in sample else 'txt'}: cannot be read ({error})")
    row["id"] = str(row.get(columns["id"], sample["__key__"]))
    return row


class ShardSplit:
    """One split: its shards in order, and where each one's samples start in the split's numbering (a sample's
    index, stable across epochs: what batches carry, augmentation seeds and evaluation sorts by)."""

    def __init__(self, source: ShardSource, split: str, tasks, transform, tokenizer, max_length: int,
                 on_bad_sample: str, augment=None):
        self.split, self.shards, self.columns = split, source.shards[split], source.columns
        self.offsets = indexed(source, split)
        self.starts = np.cumsum([0] + [len(offsets) for offsets in self.offsets]).tolist()
        self.tasks, self.transform, self.tokenizer, self.max_length = tasks, transform, tokenizer, max_length
        self.augment, self.side, self.bad = augment, None, BadRows(on_bad_sample)
        first = list(islice(self.read(0, min(source.check_sample, len(self))), source.check_sample))
        self.image_shape = check_sample(first, tasks, self.bad, transform, None)
        self.ids = SampleIds(self)
        self.targets = {}  # labelled counts are not known without a pass: summary.json leaves them out

    @property
    def skipped(self) -> int:
        return self.bad.skipped

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        shard = bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]

    def read(self, index: int, count: int):
        """Rows of samples index .. index + count - 1 (within one shard or across several)."""
        while count > 0:
            shard, position = self.locate(index)
            run = min(count, len(self.offsets[shard]) - position)
            for sample in read_samples(self.shards[shard], int(self.offsets[shard][position]), run):
                yield to_row(sample, self.columns, self.shards[shard])
            index, count = index + run, count - run

    def batch(self, indices: list[int], epoch: int | None) -> dict:
        rows = []
        for start, count in runs(indices):
            rows += self.read(start, count)
        return build_batch(rows, indices, self.tasks, self.bad, transform=self.transform, image_root=None,
                           tokenizer=self.tokenizer, max_length=self.max_length, image_size=self.image_shape,
                           augment=self.augment, side=self.side,
                           epochs=None if epoch is None else [epoch] * len(indices))


def runs(indices: list[int]):
    """Consecutive indices as (first, count) pairs: each is one seek and one read."""
    start, count = indices[0], 1
    for index in indices[1:]:
        if index == start + count:
            count += 1
        else:
            yield start, count
            start, count = index, 1
    yield start, count


class SampleIds:
    """`ids[i]`: sample i's id (evaluation writes it beside each prediction), read from its shard on demand."""

    def __init__(self, split: ShardSplit):
        self.split = split

    def __getitem__(self, index: int) -> str:
        return next(self.split.read(int(index), 1))["id"]


def streamed_rows(source: ShardSource):
    """The training split's rows without their images, shard after shard (what vocab.learnt learns from): the tar
    headers are read and the images seeked past; only the .json and .txt members are read. The same scan indexes
    the shards, so a first run reads each training shard's headers once."""

    def rows():
        for shard in source.shards["train"]:
            offsets = []
            with open(shard, "rb") as file:
                for offset, key, members in grouped(file, shard):
                    offsets.append(offset)
                    sample = {"__key__": key}
                    for extension in ("json", "txt"):
                        if extension in members:
                            file.seek(members[extension].data)
                            sample[extension] = file.read(members[extension].size)
                    yield from readable(to_row(sample, source.columns, shard))
            source.offsets[shard] = keep_index(shard, offsets, source.cache_dir)

    return rows


def readable(row: dict):
    """The row, unless it could not be read: a bad row meets data.on_bad_sample when a batch reaches it."""
    if BAD not in row:
        yield row
