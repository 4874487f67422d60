"""The checkpoint format: a plain dict of tensors, numbers and strings, loadable with weights_only=True.

Keys: format, version, config (resolved YAML text), model, optimizer, scheduler, epoch, step, rng, metrics, data
(tokenizer files, label names), text_config (architecture of a pretrained text model). Written atomically.
"""

from pathlib import Path

import torch

from mtmm.atomic import link_atomically, write_atomically  # noqa: F401 - the checkpoint's atomic writes, re-exported
from mtmm.errors import UserError

FORMAT = "mtmm-checkpoint"
VERSION = 1


def save_checkpoint(state: dict, path: Path) -> None:
    save_atomically({"format": FORMAT, "version": VERSION, **state}, path)


def save_atomically(obj, path: Path) -> None:
    """torch.save `obj` to `path` through write_atomically."""
    write_atomically(path, lambda file: torch.save(obj, file))


def load_checkpoint(path: str | Path) -> dict:
    """Load and check a checkpoint; anything else (missing, truncated, foreign) is a one-line UserError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist (expected a .pt file written by mtmm-train, "
                        f"e.g. <run folder>/checkpoints/best.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated zip, pickle of foreign objects, not a torch file at all
        raise UserError(f"checkpoint {path} cannot be read: {why_unreadable(path, error)}; "
                        f"pass a checkpoints/best.pt or last.pt written by mtmm-train") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not an mtmm checkpoint (no format={FORMAT!r} entry); "
                        f"pass a checkpoints/best.pt or last.pt written by mtmm-train")
    if state.get("version") != VERSION:
        raise UserError(f"checkpoint {path} has format version {state.get('version')}; "
                        f"this mtmm reads version {VERSION}")
    return state


def why_unreadable(path: Path, error: Exception) -> str:
    """torch.load's errors are long and technical; say in a few words what is wrong with the file."""
    with path.open("rb") as file:
        head = file.read(4)
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        return "it is not a torch file" if head else "the file is empty"
    if "Weights only load failed" in str(error):
        return "it holds pickled Python objects, which mtmm never loads (its checkpoints hold only tensors, numbers and strings)"
    return "the file is truncated or corrupt (not a complete torch archive)"
