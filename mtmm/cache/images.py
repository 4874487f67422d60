"""The decoded-image cache: our image transforms are deterministic (resize, centre crop), so a split's images decode
to the same pixels in every epoch; random augmentation (data/augment.py) runs after, on the cached uint8 rows, and
the training split is then stored a little larger than its crop. They are decoded once into one file of uint8 rows,
and every later batch reads its rows from there instead of decoding PNG or JPEG files: the same pixels, so the same
results, and a step no longer waits for decoding (README benchmark (c)).

One file per split, named by a key over the samples' image files (path, size, mtime) and the transform, as the
feature cache keys its inputs: any change gives another file. Only the main process writes; a split that does not
fit data.image_cache_gib, or the disk, or whose file another node cannot see, is decoded per step as before, so the
cache never decides a result. Rows are read with plain file reads, not a memory map: the OS keeps the file in its
page cache, and the process's own resident memory does not grow with the dataset (README benchmark (d)).
"""

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from mtmm import distributed
from mtmm.cache.keys import mark_used, samples_digest
from mtmm.checkpoint import write_atomically
from mtmm.data.dataset import ManifestDataset, different_sizes
from mtmm.data.workers import file_order_loader, loader_workers
from mtmm.errors import UserError

log = logging.getLogger("mtmm")

VERSION = 2  # bump when the pixels or the file layout change: old files are then simply not found again
# (2: images are turned upright by EXIF, 16-bit scaled, transparency composited; see data/images.py)
HEADER_BYTES = 4096  # a JSON header (format, shape), padded; the rows start here
SPARE_DISK = 1 << 30  # leave at least this much of the disk free


@dataclass(frozen=True)
class ImageStore:
    """A split's decoded images in one file: row i is sample i's uint8 [3, H, W] (zeros for an absent image)."""

    path: Path
    shape: tuple[int, int, int, int]  # N, 3, H, W

    def read(self, indices: list[int]) -> torch.Tensor:
        """uint8 [B, 3, H, W]: the rows of `indices`, read straight into the batch tensor."""
        rows = torch.empty((len(indices), *self.shape[1:]), dtype=torch.uint8)
        size = math.prod(self.shape[1:])
        view = memoryview(rows.numpy()).cast("B")
        with open(self.path, "rb", buffering=0) as file:
            for k, index in enumerate(indices):
                file.seek(HEADER_BYTES + index * size)
                if file.readinto(view[k * size:(k + 1) * size]) != size:
                    raise UserError(f"decoded-image cache {self.path} ends before row {index}; delete the file "
                                    f"(it is made again) or set data.image_cache_gib=0")
        return rows


def attach_image_caches(cfg: DictConfig, data, splits, device: torch.device,
                        rank: distributed.Rank = distributed.Rank(), make: bool = True,
                        features: dict | None = None) -> None:
    """Give each split in `splits` that decodes images its decoded-image cache (made now, or found from an earlier
    run) when the decoded images fit data.image_cache_gib; ManifestDataset.images then reads from it. `make=False`:
    only use a file that exists (a single pass over a split gains nothing from writing one). `features`: the
    feature caches (split -> modality -> outputs); a split whose image features are cached decodes no image."""
    limit = cache_limit(cfg.data.get("image_cache_gib"))
    if limit == 0:
        return
    folder = Path(cfg.data.image_cache_dir).expanduser()
    for split in splits:
        dataset = data.datasets[split]
        if dataset.transform is None or "image" in (features or {}).get(split, {}):
            continue
        shape = (len(dataset), 3, *decoded_size(dataset))
        size = file_bytes(shape)
        if size > limit:
            log.info("image cache: not for %s: its decoded images would take %.1f GiB, over data.image_cache_gib=%s; "
                     "they are decoded per step", split, size / 2**30, cfg.data.image_cache_gib)
            continue
        path = folder / f"{split}-{cache_key(dataset)}.u8"
        if rank.main and complete(path, shape):
            log.info("image cache: reused the decoded images of %s from %s", split, path)
            mark_used(path)
        elif rank.main and make:
            build(dataset, path, shape, split, cfg.data.eval_batch_size,
                  loader_workers(cfg.data.num_workers, True, device))
        distributed.wait_for_main(rank)
        if complete(path, shape):
            dataset.image_store = ImageStore(path, shape)


def cache_limit(gib) -> float:
    """data.image_cache_gib in bytes (null, as in checkpoints written before the cache existed, means 0: off)."""
    if gib is None:
        return 0
    if isinstance(gib, bool) or not isinstance(gib, (int, float)) or gib < 0:
        raise UserError(f"data.image_cache_gib={gib!r}; use a number of GiB >= 0 (0 = decode images every step)")
    return gib * 2**30


def decoded_size(dataset: ManifestDataset) -> tuple[int, int]:
    """(H, W) of the split's decoded images: what the transform crops to, else what the first image decodes to."""
    if dataset.transform.side:
        return dataset.transform.side, dataset.transform.side
    if dataset.image_size is not None:  # checked up front (data.check_images): every file has this size
        return dataset.image_size[1], dataset.image_size[0]
    first = next((i for i, path in enumerate(dataset.image_paths) if path is not None), 0)
    return tuple(dataset.images([first]).shape[2:])


class StoredRows(torch.utils.data.Dataset):
    """A split's images as stored, before augmentation crops them (the rows the cache holds), and their index."""

    def __init__(self, dataset: ManifestDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> dict:
        return {"index": torch.as_tensor(indices, dtype=torch.long), "image": self.dataset.images(indices)}


def file_bytes(shape) -> int:
    return HEADER_BYTES + math.prod(shape)


def cache_key(dataset: ManifestDataset) -> str:
    return hashlib.sha256(f"mtmm-decoded-images {VERSION}\n{samples_digest(dataset, 'image', 0)}".encode()).hexdigest()


def header(shape) -> bytes:
    text = json.dumps({"format": f"mtmm-decoded-images {VERSION}", "dtype": "uint8", "shape": list(shape)}).encode()
    return text + b" " * (HEADER_BYTES - len(text))


def is_cache_file(path: Path) -> bool:
    """Whether `path` is a file this cache wrote (any version, complete or not), not a user's file that is only
    named like one: a regular file whose first HEADER_BYTES are our JSON header, format "mtmm-decoded-images <n>"
    (written first, and always has been)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, "rb") as file:
            head = file.read(HEADER_BYTES)
        meta = json.loads(head)  # the header's padding is spaces, which JSON allows
    except (OSError, ValueError):  # unreadable, binary, not JSON: not ours
        return False
    return (len(head) == HEADER_BYTES and isinstance(meta, dict) and isinstance(meta.get("shape"), list)
            and str(meta.get("format")).startswith("mtmm-decoded-images "))


def complete(path: Path, shape) -> bool:
    """The file exists, says it holds `shape`, and has every row (a file cut short is made again, never used)."""
    try:
        with open(path, "rb") as file:
            return file.read(HEADER_BYTES) == header(shape) and path.stat().st_size == file_bytes(shape)
    except OSError:  # missing, or a folder that cannot be read here
        return False


def build(dataset: ManifestDataset, path: Path, shape, split: str, batch_size: int, workers: int) -> None:
    """Decode the split in file order, batch by batch, into `path` (written whole or not at all). A folder that
    cannot be written (a checkpoint's cache folder on another machine, a full disk) only means no cache."""
    size = file_bytes(shape)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
    except OSError as error:
        log.warning("image cache: not for %s: %s; its images are decoded per step (data.image_cache_dir sets the "
                    "folder)", split, error)
        return
    if size + SPARE_DISK > free:
        log.warning("image cache: not for %s: it needs %.1f GiB and %s has %.1f GiB free; its images are decoded "
                    "per step", split, size / 2**30, path.parent, free / 2**30)
        return
    if path.exists():
        log.warning("image cache: %s is incomplete or not ours; making it again", path)
    started = time.perf_counter()
    loader = file_order_loader(StoredRows(dataset), batch_size, workers)

    def write(file) -> None:
        file.write(header(shape))
        for batch in loader:
            if batch["image"].shape[1:] != shape[1:]:
                index = int(batch["index"][0])
                raise UserError(different_sizes(f"{dataset.manifest}, line {dataset.lines[index]}",
                                                dataset.image_paths[index], tuple(batch["image"].shape[1:]),
                                                shape[1:], "the split's first image is"))
            file.write(batch["image"].numpy().data)

    try:
        write_atomically(path, write)
    except OSError as error:
        log.warning("image cache: could not write %s (%s); the images of %s are decoded per step", path, error, split)
        return
    log.info("image cache: decoded the %d images of %s once in %.1f s, %.0f MiB in %s", shape[0], split,
             time.perf_counter() - started, size / 2**20, path)
