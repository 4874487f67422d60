"""The training order: a fresh permutation per epoch derived from (seed, epoch) alone, so a resumed run can
rebuild it exactly and skip what it already trained on; split across ranks for distributed training."""

import torch
from torch.utils.data import Sampler


class EpochShuffle(Sampler[int]):
    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1, with_epoch: bool = False):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        # with_epoch: yield (epoch, index) pairs. The epoch then travels to loader workers with each index (their
        # copy of this sampler's state is stale under persistent_workers); augmentation is seeded by it.
        self.with_epoch = with_epoch
        self.epoch, self.start = 1, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch`'s order from this rank's `start`-th sample on (after a resume)."""
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        permutation = torch.randperm(self.size, generator=generator).tolist()
        # Every rank takes the same number of samples (as DistributedSampler does): wrap around to fill.
        per_rank = -(-self.size // self.world_size)
        padded = permutation + permutation[: per_rank * self.world_size - self.size]
        return padded[self.rank::self.world_size]

    def __iter__(self):
        order = self.order()[self.start:]
        return iter([(self.epoch, index) for index in order] if self.with_epoch else order)

    def __len__(self) -> int:
        return -(-self.size // self.world_size) - self.start
