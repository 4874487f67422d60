"""Reading what runs wrote (summary.json, metrics.jsonl, config.yaml, overrides): every failure is one UserError
that names the file, and the line for metrics.jsonl."""

import json
from pathlib import Path

from omegaconf import OmegaConf

from mtmm.errors import UserError


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"cannot read {path}: there is no such file")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    if not isinstance(value, dict):
        raise UserError(f"cannot read {path}: it holds a JSON {type(value).__name__}, not an object")
    return value


def read_jsonl(path: Path) -> list[dict]:
    """One dict per non-empty line."""
    if not path.is_file():
        raise UserError(f"cannot read {path}: there is no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise UserError(f"cannot read {path} line {number}: {error}") from None
        if not isinstance(record, dict):
            raise UserError(f"cannot read {path} line {number}: a JSON {type(record).__name__}, not an object")
        records.append(record)
    return records


def read_yaml(path: Path):
    """The file as plain dicts and lists (interpolations are not resolved: the file is only read)."""
    try:
        return OmegaConf.to_container(OmegaConf.load(path))
    except Exception as error:  # OSError or any YAML parse error
        raise UserError(f"cannot read {path}: {error}") from None
