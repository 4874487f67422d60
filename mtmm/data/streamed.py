"""The data side of data=hf and data=webdataset: sources too large to read whole, whose rows are parsed, decoded
and tokenised per batch (rows.py). Start-up reads what it must and no more: a few rows per split checked, and the
labels and vocabulary learnt from one streamed pass over the training labels and texts, cached (vocab.py), or
taken from the checkpoint when evaluating."""

import torch
from omegaconf import DictConfig

from mtmm.build import has_encoder
from mtmm.data.hf_source import TableDataset, TableSource
from mtmm.data.hf_source import streamed_rows as table_rows
from mtmm.data.images import ImageTransform
from mtmm.data.tokenizer import tokenizer_from_files
from mtmm.data.vocab import Streamed, learnt
from mtmm.data.shard_loader import EpochBatches, StreamLoader
from mtmm.data.webdataset_source import ShardSource, ShardSplit, indexed
from mtmm.data.webdataset_source import streamed_rows as shard_rows
from mtmm.data.workers import loader_workers, worker_options
from mtmm.errors import UserError
from mtmm.tasks import build_tasks


def build_streamed_data(cfg: DictConfig, source, splits: tuple[str, ...], saved: dict | None, origin: str,
                        transform: ImageTransform | None, augment) -> tuple[dict, list, object]:
    """(datasets per split, TaskSpecs, tokenizer) of a TableSource (data=hf) or ShardSource (data=webdataset)."""
    check_streamed_options(cfg)
    max_length = cfg.encoder.text.get("max_length", 64)
    on_bad = cfg.data.get("on_bad_sample", "error")
    if isinstance(source, (TableSource, ShardSource)):
        kind = TableDataset if isinstance(source, TableSource) else ShardSplit  # one signature
    else:
        raise UserError(f"data.source._target_={cfg.data.source.get('_target_')!r} returned a "
                        f"{type(source).__name__}; mtmm's sources are mtmm.data.sources.manifest, "
                        f"mtmm.data.hf_source.hf and mtmm.data.webdataset_source.webdataset")
    if saved is not None:
        tasks = build_tasks(cfg, None, saved)
        tokenizer = tokenizer_from_files(saved["tokenizer_files"], origin) if has_encoder(cfg, "text") else None
    else:
        tasks, tokenizer = learnt(cfg, source.fingerprint, training_rows(cfg, source), source.cache_dir)
    datasets = {}
    for split in splits:
        augmented = augment is not None and split == "train"  # decoded a little larger, cropped per sample
        split_transform = ImageTransform(size=augment.stored_side(transform.side),
                                         interpolation=transform.interpolation) if augmented else transform
        datasets[split] = kind(source, split, tasks, split_transform, tokenizer, max_length, on_bad,
                               augment if augmented else None)
        datasets[split].side = transform.side if transform is not None else None
    return datasets, tasks, tokenizer


def training_rows(cfg: DictConfig, source) -> Streamed:
    """The training split's label and text cells, streamed (for learning classes, statistics and the vocabulary)."""
    targets = [task.target for task in cfg.tasks.values()]
    if isinstance(source, TableSource):
        table = source.tables["train"]
        return Streamed(table_rows(table, source.columns, targets), len(table), source.files["train"])
    count = lambda: sum(len(offsets) for offsets in indexed(source, "train"))  # noqa: E731 - after the pass, free
    return Streamed(shard_rows(source), count, f"the shards of data.source.train ({len(source.shards['train'])})",
                    fields=[*targets, "text"])  # kept after the first pass: a second is as slow as the first


def check_streamed_options(cfg: DictConfig) -> None:
    """What needs a full pass over the data is refused at start-up, with the setting that avoids it."""
    frozen = [m for m in ("image", "text") if has_encoder(cfg, m) and cfg.encoder[m].get("freeze")]
    if frozen and cfg.trainer.get("feature_cache"):
        raise UserError(f"data={cfg.data.source._target_.split('.')[-1]} reads its rows per batch, but "
                        f"trainer.feature_cache=true would run the frozen encoder ({', '.join(frozen)}) over every "
                        f"sample before training; set trainer.feature_cache=false (the frozen encoder then runs "
                        f"live)")
    if cfg.data.get("image_cache_gib"):
        raise UserError(f"data.image_cache_gib={cfg.data.image_cache_gib}: the decoded-image cache decodes every "
                        f"image before training, which data={cfg.data.source._target_.split('.')[-1]} avoids; set "
                        f"data.image_cache_gib=0")


def stream_loader(cfg: DictConfig, split: ShardSplit, training: bool, seed: int, device: torch.device | None,
                  rank: int, world_size: int) -> StreamLoader:
    """The loader of a webdataset split: this rank's batches of each epoch (shard_loader.EpochBatches)."""
    batch_size = cfg.data.batch_size if training else cfg.data.eval_batch_size
    if training and batch_size % world_size:
        raise UserError(f"data.batch_size={batch_size} must be a multiple of device.nproc_per_node={world_size}")
    per_rank = batch_size // world_size if training else batch_size
    batches = EpochBatches(split, per_rank, training, seed, rank, world_size)
    workers = loader_workers(cfg.data.num_workers, split.transform is not None, device)
    pin = bool(cfg.data.get("pin_memory", True)) and device is not None and device.type == "cuda"
    return StreamLoader(batches, worker_options(workers), pin, seed)
