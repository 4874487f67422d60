"""The frozen-encoder feature cache: a frozen encoder's outputs on a split never change, so they are computed
once, kept on disk and memory-mapped, and training reads rows of them instead of decoding images and running
the encoder every epoch.

One file per (split, modality), named by a key over everything the outputs depend on: the encoder's config and
weights, the transform and the split's samples. Any change gives another key, so another file; an existing
file is never rewritten. Our image transforms (resize, centre crop) and tokenisation are deterministic, which is
what makes every frozen encoder cacheable (an augmented training split is the exception: its image features are
computed live); modality dropout and missing modalities are handled by the model
after the encoder, so they work on cached features as on live ones.
"""

import hashlib
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from mtmm import distributed
from mtmm.cache.keys import mark_used, samples_digest
from mtmm.checkpoint import save_atomically
from mtmm.data.dataset import ManifestDataset
from mtmm.data.workers import file_order_loader, loader_workers
from mtmm.loop import to_device
from mtmm.models.features import Features

log = logging.getLogger("mtmm")

VERSION = 2  # bump when what is stored, or how, changes: old files are then simply not found again
# (2: the decoded pixels changed with data/images.py: EXIF turn, 16-bit, transparency)

Cached = dict[str, torch.Tensor]  # pooled [N, D] (before the encoder's norm), tokens [N, T, D], mask [N, T]


def feature_caches(cfg: DictConfig, model: nn.Module, data, device: torch.device,
                   rank: distributed.Rank = distributed.Rank()) -> dict[str, dict[str, Cached]]:
    """split -> modality -> the memory-mapped outputs of each frozen encoder on that split, computed now or found
    from an earlier run. Empty when no encoder is frozen."""
    paths = cache_paths(cfg, model, data)
    caches = {}
    for split, files in paths.items():
        missing = [modality for modality, path in files.items() if not path.is_file()]
        if missing and rank.main:  # only the main process writes; the others wait at the barrier and read
            started = time.perf_counter()
            computed = compute_features({m: model.encoders[m] for m in missing}, data.datasets[split],
                                        cfg.data.eval_batch_size,
                                        loader_workers(cfg.data.num_workers, "image" in missing, device), device)
            for modality, tensors in computed.items():
                save_atomically(tensors, files[modality])
            log.info("feature cache: computed %s of %s (%d samples) in %.1f s, in %s", "+".join(missing), split,
                     len(data.datasets[split]), time.perf_counter() - started, files[missing[0]].parent)
        distributed.wait_for_main(rank)
        reused = [modality for modality in files if modality not in missing]
        if reused:
            log.info("feature cache: reused %s of %s from %s", "+".join(reused), split, files[reused[0]].parent)
        for modality in reused:
            mark_used(files[modality])
        # mmap: the OS pages rows in as batches ask for them, so memory does not grow with the dataset.
        caches[split] = {m: torch.load(path, mmap=True, weights_only=True) for m, path in files.items()}
    return caches


def cache_paths(cfg: DictConfig, model: nn.Module, data) -> dict[str, dict[str, Path]]:
    """split -> modality -> the cache file of each frozen encoder (present or not)."""
    frozen = {modality: encoder for modality, encoder in model.encoders.items() if encoder.frozen}
    if not frozen:
        return {}
    folder = Path(cfg.trainer.feature_cache_dir).expanduser()
    augmented = [split for split, dataset in data.datasets.items() if getattr(dataset, "augment", None) is not None]
    if "image" in frozen and augmented:
        log.info("feature cache: not for the image features of %s: augmentation (augment) gives them new pixels "
                 "every epoch, so the frozen image encoder runs on them live", "+".join(augmented))
    encoders = {m: OmegaConf.to_yaml(cfg.encoder[m], resolve=True) + weights_digest(e) for m, e in frozen.items()}
    paths = {}
    for split, dataset in data.datasets.items():
        paths[split] = {}
        for modality in frozen:
            if modality == "image" and split in augmented:
                continue
            key = hashlib.sha256(f"mtmm-features {VERSION} {modality}\n{encoders[modality]}\n"
                                 f"{samples_digest(dataset, modality, pad_id(data))}".encode()).hexdigest()
            paths[split][modality] = folder / f"{split}-{modality}-{key}.pt"
    return paths


def is_cache_file(path: Path) -> bool:
    """Whether `path` holds what this cache stores, not a user's file that is only named like one: a torch file
    that loads with weights_only (no code runs) and memory-mapped (no rows are read) as exactly pooled [N, D],
    tokens [N, T, D] and mask [N, T] (bool), which files of every version are."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - not a torch file, truncated, pickled objects: not ours
        return False
    if not isinstance(saved, dict) or set(saved) != {"pooled", "tokens", "mask"}:
        return False
    pooled, tokens, mask = saved["pooled"], saved["tokens"], saved["mask"]
    if not all(isinstance(tensor, torch.Tensor) for tensor in (pooled, tokens, mask)):
        return False
    return (pooled.dim() == 2 and tokens.dim() == 3 and mask.dtype == torch.bool
            and mask.shape == tokens.shape[:2] and len(pooled) == len(tokens))


def weights_digest(encoder: nn.Module) -> str:
    """sha256 of the encoder's weights and buffers, all but its final norm (applied live, after the cache)."""
    digest = hashlib.sha256()
    for name, tensor in encoder.state_dict().items():
        if name.startswith("norm."):
            continue
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def pad_id(data) -> int:
    return data.tokenizer.pad_token_id if data.tokenizer is not None else 0


class SkipModalities(Dataset):
    """A split whose batches leave out the inputs of some modalities (no image decoded, no token ids): the index and
    the presence flags are all a cached modality needs."""

    def __init__(self, dataset: ManifestDataset, modalities):
        self.dataset, self.without = dataset, frozenset(modalities)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> dict:
        return self.dataset.batch(indices, without=self.without)

    def __getitem__(self, index: int) -> dict:
        return self.dataset.batch([index], without=self.without)


@torch.no_grad()
def compute_features(encoders: dict[str, nn.Module], dataset: ManifestDataset, batch_size: int,
                     num_workers: int, device: torch.device) -> dict[str, Cached]:
    """Run `encoders` over the split in file order, batched through the training data path (same transform, same
    tokens), in eval mode and float32; tokens are padded to the split's longest sequence."""
    others = {"image", "text"} - set(encoders)  # inputs not needed now: not decoded
    loader = file_order_loader(SkipModalities(dataset, others), batch_size, num_workers)
    modes = {modality: encoder.training for modality, encoder in encoders.items()}
    parts = {modality: [] for modality in encoders}
    try:
        for encoder in encoders.values():
            encoder.eval()
        for batch in loader:
            batch = to_device(batch, device)
            for modality, encoder in encoders.items():
                features = encode_before_norm(encoder, batch[modality])
                parts[modality].append([features.pooled.cpu(), features.tokens.cpu(), features.mask.cpu()])
    finally:
        for modality, encoder in encoders.items():
            encoder.train(modes[modality])
    return {modality: stack(batches) for modality, batches in parts.items()}


def encode_before_norm(encoder: nn.Module, inputs) -> Features:
    """The encoder's Features with `pooled` taken before its final LayerNorm (every encoder ends in `self.norm`):
    that norm stays trainable when the encoder is frozen, so the model applies it live to the cached values."""
    captured = []
    hook = encoder.norm.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    try:
        features = encoder(inputs)
    finally:
        hook.remove()
    return Features(pooled=captured[-1], tokens=features.tokens, mask=features.mask)


def stack(batches: list[list[torch.Tensor]]) -> Cached:
    """Per-batch outputs -> one tensor each, tokens and mask padded to the longest sequence of the split."""
    size, length = sum(len(pooled) for pooled, _, _ in batches), max(tokens.shape[1] for _, tokens, _ in batches)
    tokens = torch.zeros(size, length, batches[0][1].shape[2], dtype=batches[0][1].dtype)
    mask = torch.zeros(size, length, dtype=torch.bool)
    row = 0
    for _, batch_tokens, batch_mask in batches:
        rows, width = batch_tokens.shape[:2]
        tokens[row:row + rows, :width], mask[row:row + rows, :width] = batch_tokens, batch_mask
        row += rows
    return {"pooled": torch.cat([pooled for pooled, _, _ in batches]), "tokens": tokens, "mask": mask}
