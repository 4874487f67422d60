"""Public image+text datasets read in the layouts their authors distribute. mtmm never downloads them: point
`data.source.root` at your copy."""

import json
from pathlib import Path

from mtmm.data.readers import LINE, read_manifest
from mtmm.data.sources import DataSource
from mtmm.errors import UserError


def existing_root(root: str, name: str, expected: str) -> Path:
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise UserError(f"data.source.root={root!r} is not a folder; download {name} yourself and set "
                        f"data.source.root to the folder that holds {expected}")
    return folder


def hateful_memes(root: str) -> DataSource:
    """Hateful Memes: img/ plus train.jsonl, dev_seen.jsonl, test_seen.jsonl (fields id, img, label, text)."""
    folder = existing_root(root, "Hateful Memes", "img/ and train.jsonl, dev_seen.jsonl, test_seen.jsonl")
    files = {"train": folder / "train.jsonl", "val": folder / "dev_seen.jsonl", "test": folder / "test_seen.jsonl"}
    records = {}
    for split, path in files.items():
        records[split] = [{**record, "image": record.get("img")} for record in read_manifest(path)]
    return DataSource(records, files, folder)


CRISISMMD_TASKS = ("informative", "humanitarian", "damage")


def crisismmd(root: str) -> DataSource:
    """CrisisMMD v2.0 as one multi-task problem: the three task files of each split are joined on (tweet_id,
    image_id); a sample missing from one task's file has no label for that task."""
    folder = existing_root(root, "CrisisMMD v2.0", "crisismmd_datasplit_all/ and data_image/")
    records, files = {}, {}
    for split, suffix in (("train", "train"), ("val", "dev"), ("test", "test")):
        joined: dict[tuple, dict] = {}
        for task in CRISISMMD_TASKS:
            path = folder / "crisismmd_datasplit_all" / f"task_{task}_text_img_{suffix}.tsv"
            files.setdefault(split, path)
            for record in read_manifest(path):
                key = (record.get("tweet_id"), record.get("image_id"))
                sample = joined.setdefault(key, {"id": record.get("image_id"), "image": record.get("image"),
                                                 "text": record.get("tweet_text"), LINE: record[LINE],
                                                 **{name: None for name in CRISISMMD_TASKS}})
                sample[task] = record.get("label")
        records[split] = list(joined.values())
    return DataSource(records, files, folder)


def mmimdb(root: str) -> DataSource:
    """MM-IMDb: split.json ({"train"|"dev"|"test": [ids]}) and dataset/<id>.jpeg + dataset/<id>.json (plot, genres).
    The text is the first plot summary; `genres` is a multilabel target."""
    folder = existing_root(root, "MM-IMDb", "split.json and dataset/")
    split_file = folder / "split.json"
    try:
        splits = json.loads(split_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{split_file} cannot be read as JSON: {error}") from None
    records, files = {}, {}
    for split, key in (("train", "train"), ("val", "dev"), ("test", "test")):
        if key not in splits:
            raise UserError(f"{split_file} has no {key!r} list; it has {sorted(splits)}")
        records[split], files[split] = [], split_file
        for number, movie in enumerate(splits[key], start=1):
            meta_path = folder / "dataset" / f"{movie}.json"
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:
                raise UserError(f"{split_file}, {key} entry {number} ({movie}): cannot read {meta_path}: {error}") from None
            plot = meta.get("plot") or [""]
            records[split].append({"id": str(movie), "image": f"dataset/{movie}.jpeg", LINE: number,
                                   "text": plot[0] if isinstance(plot, list) else str(plot),
                                   "genres": meta.get("genres")})
    return DataSource(records, files, folder)
