"""Where a dataset's files are: one JSONL manifest per split and the folder image paths are relative to."""

from dataclasses import dataclass
from pathlib import Path

from mtmm.data.shapes import prepare_shapes


@dataclass(frozen=True)
class DataSource:
    manifests: dict[str, Path]  # split (train, val, test) -> JSONL manifest
    image_root: Path  # image paths in the manifests are relative to this folder


def shapes(cache_dir: str, seed: int = 0, image_size: int = 64, train: int = 4000, val: int = 500, test: int = 500,
           background: str = "grey") -> DataSource:
    """The embedded `shapes` dataset, generated into cache_dir on first use."""
    folder = prepare_shapes(cache_dir, seed=seed, image_size=image_size, train=train, val=val, test=test,
                            background=background)
    return DataSource(manifests={split: folder / f"{split}.jsonl" for split in ("train", "val", "test")},
                      image_root=folder)
