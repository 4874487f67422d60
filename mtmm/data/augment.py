"""Training-time image augmentation (`augment=light|strong`): torchvision.transforms.v2 on the uint8 rows the
dataset decoded (or read from the decoded-image cache), one sample at a time.

Each sample's random numbers come from (run seed, epoch, sample index) alone: the sampler hands the epoch to the
dataset with every index (data/sampler.py), so loader workers, persistent or not, and a run resumed mid-epoch draw
exactly what an uninterrupted run drew, and the global RNG (dropout, modality dropout) is left untouched.
"""

import hashlib

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import center_crop

from mtmm.errors import UserError

POLICIES = ("randaugment", "trivialaugment")


class Augment:
    """uint8 [B, 3, H, W] stored rows -> uint8 [B, 3, side, side]: a random resized crop, flip, colour jitter and an
    optional RandAugment / TrivialAugmentWide per sample for training; the centre crop for anything else."""

    def __init__(self, enlarge: float = 1.15, scale=(0.6, 1.0), flip: float = 0.5, brightness: float = 0.0,
                 contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0, policy: str | None = None,
                 seed: int = 0):
        if not isinstance(enlarge, (int, float)) or enlarge < 1:
            raise UserError(f"augment.enlarge={enlarge!r}; use a number >= 1 (stored side = crop side x this)")
        if policy is not None and policy not in POLICIES:
            raise UserError(f"augment.policy={policy!r}; use null or one of {list(POLICIES)}")
        scale = tuple(scale)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise UserError(f"augment.scale={list(scale)}; use [low, high] with 0 < low <= high <= 1")
        self.enlarge, self.scale, self.seed = float(enlarge), scale, seed
        steps = [v2.RandomHorizontalFlip(flip)]
        if brightness or contrast or saturation or hue:
            steps.append(v2.ColorJitter(brightness, contrast, saturation, hue))
        if policy == "randaugment":
            steps.append(v2.RandAugment())
        elif policy == "trivialaugment":
            steps.append(v2.TrivialAugmentWide())
        self.after_crop = v2.Compose(steps)

    def stored_side(self, side: int | None) -> int | None:
        """The side the training split's images are decoded (and cached) at: a little larger than the crop."""
        return None if side is None else round(side * self.enlarge)

    def __call__(self, rows: torch.Tensor, side: int | None, epochs: list[int] | None, indices: list[int],
                 present: torch.Tensor | None = None) -> torch.Tensor:
        """`epochs` None (file-order loaders: caches, evaluation of the training split): the centre crop."""
        size = [side, side] if side else list(rows.shape[2:])  # files kept at their size: crops resized back to it
        if epochs is None:
            return center_crop(rows, size)
        crop = v2.RandomResizedCrop(size, scale=self.scale, antialias=True)
        out = torch.empty((len(rows), 3, *size), dtype=torch.uint8)
        with torch.random.fork_rng(devices=[]):  # the global RNG stream is restored afterwards
            for k, (epoch, index) in enumerate(zip(epochs, indices)):
                if present is not None and not present[k]:  # an absent image: the model ignores its pixels
                    out[k] = center_crop(rows[k], size)
                    continue
                torch.manual_seed(sample_seed(self.seed, epoch, index))
                out[k] = self.after_crop(crop(rows[k]))
        return out


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from (seed, epoch, index): hashed, so neighbouring samples and epochs get unrelated streams."""
    digest = hashlib.blake2b(f"mtmm-augment {seed} {epoch} {index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def build_augment(node, seed: int) -> Augment | None:
    """cfg.augment -> an Augment, or None for augment=none (`_target_: null`)."""
    if node is None or node.get("_target_") is None:
        return None
    from mtmm.build import instantiate
    return instantiate(node, seed=seed)
