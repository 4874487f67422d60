"""Manifest files -> lists of records (dicts), each remembering the line it came from for error messages."""

import csv
import json
from pathlib import Path

from mtmm.errors import UserError

LINE = "_line"  # key added to every record: its line number in the file (1-based)


def read_manifest(path: Path) -> list[dict]:
    """A JSONL (.jsonl/.json), CSV (.csv) or TSV (.tsv/.tab) manifest; the format follows the suffix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json", ".ndjson"):
            records = read_jsonl(path)
        elif suffix in (".csv", ".tsv", ".tab"):
            records = read_table(path, delimiter="," if suffix == ".csv" else "\t")
        else:
            raise UserError(f"manifest {path}: unknown format {suffix!r}; use .jsonl, .csv or .tsv")
    except UnicodeDecodeError as error:
        raise UserError(f"manifest {path} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    if not records:
        raise UserError(f"manifest {path} holds no samples")
    return records


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object per line; blank lines are skipped, a malformed line is an error naming file and line."""
    records = []
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}, line {number}: not valid JSON ({error.msg}): {line.strip()[:80]!r}") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}, line {number}: expected a JSON object, got {line.strip()[:80]!r}")
            record[LINE] = number
            records.append(record)
    return records


def read_table(path: Path, delimiter: str) -> list[dict]:
    """CSV/TSV with a header row; empty cells become None (no label / absent modality)."""
    records = []
    with Path(path).open(encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file, delimiter=delimiter)
        if not reader.fieldnames:
            return []
        for record in reader:
            if None in record:  # more cells than header columns
                raise UserError(f"{path}, line {reader.line_num}: {len(reader.fieldnames) + len(record[None])} cells "
                                f"but the header has {len(reader.fieldnames)} columns")
            if all(value in (None, "") for value in record.values()):
                continue
            clean = {key: (value if value != "" else None) for key, value in record.items()}
            clean[LINE] = reader.line_num
            records.append(clean)
    return records


def columns_of(records: list[dict]) -> set[str]:
    return set().union(*(record.keys() for record in records)) - {LINE}
