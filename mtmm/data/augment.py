"""Training-time image augmentation (`augment=light|strong`) on the uint8 rows the dataset decoded (or read from the
decoded-image cache): a random resized crop, flip and colour jitter with torchvision's semantics, then an optional
RandAugment / TrivialAugmentWide.

Each sample's random numbers come from (run seed, epoch, sample index) alone: the sampler hands the epoch to the
dataset with every index (data/sampler.py), so loader workers, persistent or not, and a run resumed mid-epoch draw
exactly what an uninterrupted run drew, and the global RNG (dropout, modality dropout) is left untouched.

Why not v2.Compose per sample: at 64 px a transform call is mostly Python and dispatch, and seeding the global RNG
under fork_rng per sample costs more than the pixels (0.65 ms a sample for crop + flip, 1.1 ms with jitter; several
ms with two threads on tiny tensors). Here each sample's parameters are drawn in one call from its own
torch.Generator; only the crop + resize (a different shape per sample) runs per sample, on one thread; flips and
jitter run once over the batch with per-sample factors (the same kernels as torchvision's, tests/test_augment.py).
"""

import hashlib
import math

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import center_crop, resized_crop, to_dtype

from mtmm.device import one_thread
from mtmm.errors import UserError

POLICIES = ("randaugment", "trivialaugment")
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect ratios
ATTEMPTS = 10  # and its tries before falling back to the centre crop
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


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
        if not isinstance(flip, (int, float)) or not 0 <= flip <= 1:
            raise UserError(f"augment.flip={flip!r}; use a probability between 0 and 1")
        self.enlarge, self.scale, self.flip, self.seed = float(enlarge), scale, float(flip), seed
        try:  # torchvision's own checks and ranges: [max(0, 1 - b), 1 + b], hue [-h, h]
            jitter = v2.ColorJitter(brightness, contrast, saturation, hue)
        except (TypeError, ValueError) as error:
            raise UserError(f"augment colour jitter: {error}") from None
        # (name, (low, high) or None when off) in ColorJitter's numbering: its random order permutes these four
        self.jitter = [(name, getattr(jitter, name)) for name in ("brightness", "contrast", "saturation", "hue")]
        self.policy = (v2.RandAugment() if policy == "randaugment" else v2.TrivialAugmentWide()
                       if policy == "trivialaugment" else None)

    def stored_side(self, side: int | None) -> int | None:
        """The side the training split's images are decoded (and cached) at: a little larger than the crop."""
        return None if side is None else round(side * self.enlarge)

    def __call__(self, rows: torch.Tensor, side: int | None, epochs: list[int] | None, indices: list[int],
                 present: torch.Tensor | None = None) -> torch.Tensor:
        """`epochs` None (file-order loaders: caches, evaluation of the training split): the centre crop."""
        size = [side, side] if side else list(rows.shape[2:])  # files kept at their size: crops resized back to it
        if epochs is None:
            return center_crop(rows, size)
        with one_thread():  # tiny tensors: a second thread costs more than it saves (several times, under load)
            return self.augment(rows, size, epochs, indices, present)

    def augment(self, rows: torch.Tensor, size: list[int], epochs: list[int], indices: list[int],
                present: torch.Tensor | None) -> torch.Tensor:
        """__call__'s training path: crop + resize per sample, then flip, jitter (batched) and policy (per sample)."""
        height, width = rows.shape[2:]
        out = torch.empty((len(rows), 3, *size), dtype=torch.uint8)
        drawn = {}  # row -> its parameters, for the rows augmented (an absent image: the model ignores its pixels)
        present = [True] * len(rows) if present is None else present.tolist()
        for k, (epoch, index) in enumerate(zip(epochs, indices)):
            if not present[k]:
                out[k] = center_crop(rows[k], size)
                continue
            drawn[k] = params = self.draw(sample_seed(self.seed, epoch, index), height, width)
            top, left, h, w = params["crop"]
            out[k] = resized_crop(rows[k], top, left, h, w, size, antialias=True)
        flipped = torch.tensor([k for k, params in drawn.items() if params["flip"]], dtype=torch.long)
        out[flipped] = out[flipped].flip(-1)
        if drawn and any(span is not None for _, span in self.jitter):
            if len(drawn) == len(out):
                out = self.color_jitter(out, list(drawn.values()))
            else:
                picked = torch.tensor(list(drawn))
                out[picked] = self.color_jitter(out[picked], list(drawn.values()))
        if self.policy is not None:
            with torch.random.fork_rng(devices=[]):  # the global RNG stream is restored afterwards
                for k, params in drawn.items():
                    torch.manual_seed(params["seed"])
                    out[k] = self.policy(out[k])
        return out

    def draw(self, seed: int, height: int, width: int) -> dict:
        """One sample's parameters, all from one call to its own generator: RandomResizedCrop's (its 10 tries, then
        the centre crop), the flip, ColorJitter's factors and order."""
        u = torch.rand(ATTEMPTS * 2 + 11, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
        area, (low, high) = height * width, self.scale
        log_low, log_high = math.log(RATIO[0]), math.log(RATIO[1])
        for attempt in range(ATTEMPTS):
            target = area * (low + (high - low) * u[2 * attempt])
            ratio = math.exp(log_low + (log_high - log_low) * u[2 * attempt + 1])
            w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                crop = (int(u[20] * (height - h + 1)), int(u[21] * (width - w + 1)), h, w)
                break
        else:  # RandomResizedCrop's fallback: the centre crop at the nearest allowed ratio
            w, h = width, height
            if width / height < RATIO[0]:
                h = int(round(w / RATIO[0]))
            elif width / height > RATIO[1]:
                w = int(round(h * RATIO[1]))
            crop = ((height - h) // 2, (width - w) // 2, h, w)
        factors = [None if span is None else span[0] + (span[1] - span[0]) * u[23 + n]
                   for n, (_, span) in enumerate(self.jitter)]
        order = sorted(range(4), key=lambda n: u[27 + n])  # a random permutation, as ColorJitter's randperm(4)
        return {"crop": crop, "flip": u[22] < self.flip, "factors": factors, "order": order, "seed": seed}

    def color_jitter(self, images: torch.Tensor, params: list[dict]) -> torch.Tensor:
        """ColorJitter on a batch, each image with its own factors and order: the images that share an order are
        adjusted together, in that order, each adjustment once with one factor per image (torchvision's kernels,
        batched)."""
        groups: dict[tuple, list[int]] = {}
        for k, p in enumerate(params):
            groups.setdefault(tuple(n for n in p["order"] if self.jitter[n][1] is not None), []).append(k)
        grouped = torch.tensor([k for members in groups.values() for k in members])
        pieces, start, ordered = [], 0, images[grouped]
        for order, members in groups.items():
            piece = ordered[start:start + len(members)]
            start += len(members)
            for n in order:
                factor = torch.tensor([params[k]["factors"][n] for k in members], dtype=torch.float64)
                piece = ADJUST[self.jitter[n][0]](piece, factor.view(-1, 1, 1, 1))
            pieces.append(piece)
        out = torch.empty_like(images)
        out[grouped] = torch.cat(pieces)
        return out


def gray(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [B, 1, H, W], floored (as torchvision's adjustments of uint8 images use it)."""
    r, g, b = images.unbind(dim=-3)
    return r.mul(GRAY[0]).add_(g, alpha=GRAY[1]).add_(b, alpha=GRAY[2]).floor_().unsqueeze(-3)


def blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ratio (float64, as torchvision's Python float) x images + (1 - ratio) x other, back to uint8."""
    return images.mul(ratio.float()).addcmul_(other, (1.0 - ratio).float()).clamp_(0, 255).to(torch.uint8)


def adjust_hue(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue, with one shift per image."""
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv
    hsv = _rgb_to_hsv(to_dtype(images, torch.float32, scale=True))
    hsv[:, 0].add_(factor.view(-1, 1, 1).float()).remainder_(1.0)
    return to_dtype(_hsv_to_rgb(hsv), torch.uint8, scale=True)


ADJUST = {"brightness": lambda x, f: x.mul(f.float()).clamp_(0, 255).to(torch.uint8),
          "contrast": lambda x, f: blend(x, gray(x).mean(dim=(-3, -2, -1), keepdim=True), f),
          "saturation": lambda x, f: blend(x, gray(x), f),
          "hue": adjust_hue}


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
