"""The loader of a webdataset split (webdataset_source.py): per epoch, the shards in an order seeded by (seed, epoch);
rank r takes the r-th contiguous share of that sequence of samples (ranks read different shards, each sample once;
when the count does not divide by the number of ranks, the last rank wraps round to the start, as
DistributedSampler pads, so every rank takes the same number of steps); the share is cut into batches and batch j
is built by loader worker j mod workers. Batch j is the same whatever the number of workers, and a resumed run
starts at the batch it stopped before: exact, on CPU as anywhere."""

import random
from bisect import bisect_right

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtmm.data.collate import finish_batch
from mtmm.data.webdataset_source import ShardSplit


class EpochBatches(IterableDataset):
    """The batches of one rank for one epoch (see the module's docstring), worker j mod W building batch j."""

    def __init__(self, split: ShardSplit, batch_size: int, training: bool, seed: int, rank: int, world_size: int):
        self.split, self.batch_size, self.training, self.seed = split, batch_size, training, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 1, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch` from this rank's `start`-th sample on (after a resume); start is whole batches."""
        self.epoch, self.start = epoch, start

    def share(self) -> tuple[int, int]:
        """(first position, count) of this rank's share of the epoch's sequence."""
        total = len(self.split)
        if not self.training:  # evaluation: every sample once, shares differ by at most one
            first = self.rank * total // self.world_size
            return first, (self.rank + 1) * total // self.world_size - first
        per_rank = -(-total // self.world_size)  # equal shares, so every rank takes the same number of steps
        return self.rank * per_rank, per_rank

    def batches(self) -> int:
        return -(-self.share()[1] // self.batch_size)

    def order(self) -> list[int]:
        """The shards in this epoch's order: seeded by (seed, epoch) for training, file order for evaluation."""
        shards = list(range(len(self.split.shards)))
        if self.training:
            random.Random(self.seed * 100_003 + self.epoch).shuffle(shards)
        return shards

    def positions(self, batch: int, order: list[int], starts: list[int]) -> list[int]:
        """Sample indices of this rank's batch `batch`: positions in the epoch's sequence -> stable indices."""
        first, count = self.share()
        total = len(self.split)
        begin = batch * self.batch_size
        indices = []
        for k in range(begin, min(begin + self.batch_size, count)):
            position = (first + k) % total  # the last rank wraps round to the start
            shard = bisect_right(starts, position) - 1
            indices.append(self.split.starts[order[shard]] + position - starts[shard])
        return indices

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = self.order()
        sizes = [len(self.split.offsets[shard]) for shard in order]
        starts = np.cumsum([0] + sizes).tolist()
        for batch in range(self.start // self.batch_size, self.batches()):
            if batch % workers == worker:
                yield self.split.batch(self.positions(batch, order, starts), self.epoch if self.training else None)


class StreamLoader:
    """What the loop needs of a loader, over a stream: iteration, len (batches left this epoch), batch_size and
    sampler.set_epoch, as a DataLoader with EpochShuffle offers them. Workers are started per epoch (not
    persistent), so that each gets the epoch's plan."""

    def __init__(self, batches: EpochBatches, worker_options: dict, pin_memory: bool, seed: int = 0):
        self.sampler, self.batch_size = batches, batches.batch_size
        # Its own generator: an iterator made without one draws its seed from the global RNG, and a resumed run
        # (which makes one more) would then draw different dropout masks from the uninterrupted run.
        self.loader = DataLoader(batches, batch_size=None, collate_fn=finish_batch, pin_memory=pin_memory,
                                 generator=torch.Generator().manual_seed(seed), **worker_options)

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return self.sampler.batches() - self.sampler.start // self.batch_size
