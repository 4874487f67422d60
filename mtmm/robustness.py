"""Robustness of a trained model: its metrics on one split with a modality removed, and as the images or the
texts are corrupted more and more (level 0 = clean, 1 = the strongest corruption).

Every corruption is deterministic: images draw from a torch.Generator seeded by (seed, corruption, level, batch
number), texts from a random.Random seeded by (seed, corruption, level, sample index), both on the CPU, so every
device sees the same corrupted inputs. Level 0 leaves the input untouched and reproduces the clean metrics exactly.
"""

import math
import random
import re
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor

from mtmm.data.build import build_loader
from mtmm.data.collate import pad_token_ids
from mtmm.errors import UserError
from mtmm.loop import predict, score

LEVELS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
IMAGE_CORRUPTIONS = ("gaussian_noise", "blur")
TEXT_CORRUPTIONS = ("char_swap", "typo", "word_drop")
NOISE_SIGMA_MAX = 128.0  # gaussian_noise: std of the added noise at level 1, in 0..255 pixel units
BLUR_SIGMA_MAX = 3.0  # blur: Gaussian sigma at level 1, in pixels
TYPO_RATE_MAX = 0.25  # typo: share of letters replaced at level 1 (about one per word of average length)


def keyboard_neighbours() -> dict[str, str]:
    """QWERTY keys next to each letter: left and right on its row, and the touching keys of the rows above and
    below (each row sits half a key to the right of the one above): s -> a d w e z x."""
    rows = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
    near = {}
    for r, row in enumerate(rows):
        for c, key in enumerate(row):
            spots = [(r, c - 1), (r, c + 1), (r - 1, c), (r - 1, c + 1), (r + 1, c - 1), (r + 1, c)]
            near[key] = "".join(rows[i][j] for i, j in spots if 0 <= i < len(rows) and 0 <= j < len(rows[i]))
    return near


NEIGHBOURS = keyboard_neighbours()


def corrupt_images(images: Tensor, kind: str, level: float, generator: torch.Generator) -> Tensor:
    """uint8 [B,3,H,W] -> uint8 [B,3,H,W]; the noise is drawn on the generator's device.

    gaussian_noise: add N(0, (level * 128)^2) per pixel and channel, round, clip to 0..255.
    blur: Gaussian blur with sigma = level * 3 px, kernel 2*ceil(3 sigma)+1 (at least 3), edges replicated."""
    check_level(level)
    if kind not in IMAGE_CORRUPTIONS:
        raise UserError(f"image corruption {kind!r} is not known; use one of {', '.join(IMAGE_CORRUPTIONS)}")
    if level == 0:
        return images.clone()
    pixels = images.float()
    if kind == "gaussian_noise":
        noise = torch.randn(pixels.shape, generator=generator, device=generator.device).to(pixels.device)
        pixels = pixels + noise * (level * NOISE_SIGMA_MAX)
    else:
        sigma = level * BLUR_SIGMA_MAX
        radius = max(1, math.ceil(3 * sigma))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=pixels.device)
        kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
        kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)  # [3,1,1,K]: one filter per channel
        pixels = F.pad(pixels, (radius, radius, radius, radius), mode="replicate")
        pixels = F.conv2d(F.conv2d(pixels, kernel, groups=3), kernel.transpose(2, 3), groups=3)  # rows, then columns
    return pixels.round().clamp(0, 255).to(torch.uint8)


def corrupt_text(text: str, kind: str, level: float, rng: random.Random) -> str:
    """One raw text, corrupted. Words are runs of non-space characters.

    char_swap: each word, with probability `level`, swaps one random pair of adjacent, different characters
        (the characters are kept, only their order changes; whitespace is kept as it is).
    typo: each ASCII letter, with probability `level` * 0.25, becomes a random QWERTY neighbour of the same case.
    word_drop: each word is dropped with probability `level`; the survivors are joined by single spaces
        (level 1 leaves the empty string)."""
    check_level(level)
    if kind not in TEXT_CORRUPTIONS:
        raise UserError(f"text corruption {kind!r} is not known; use one of {', '.join(TEXT_CORRUPTIONS)}")
    if level == 0:
        return text
    if kind == "word_drop":
        return " ".join(word for word in text.split() if rng.random() >= level)
    if kind == "typo":
        rate = level * TYPO_RATE_MAX
        return "".join(typo(char, rng) if char.lower() in NEIGHBOURS and rng.random() < rate else char for char in text)
    parts = re.split(r"(\s+)", text)  # words at even positions, the whitespace between them at odd ones
    for i in range(0, len(parts), 2):
        word = parts[i]
        swappable = [j for j in range(len(word) - 1) if word[j] != word[j + 1]]
        if swappable and rng.random() < level:
            j = rng.choice(swappable)
            parts[i] = word[:j] + word[j + 1] + word[j] + word[j + 2:]
    return "".join(parts)


def typo(char: str, rng: random.Random) -> str:
    new = rng.choice(NEIGHBOURS[char.lower()])
    return new.upper() if char.isupper() else new


def check_level(level: float) -> None:
    if not 0.0 <= level <= 1.0:
        raise UserError(f"corruption level {level} is outside 0..1")


def stable_seed(*parts) -> int:
    """A seed from its parts that is the same in every process (Python's hash() of a str is not)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


@torch.no_grad()
def evaluate_robustness(model, cfg, data, split: str, device, precision: str, levels=LEVELS, seed: int = 0) -> dict:
    """Metrics of `split` ({task: {metric: value}}, as mtmm.loop.score gives them) clean, with each of the model's
    modalities removed ("missing"), and per corruption of those modalities and level, with each curve's
    normalised area ("auc") and that area over the clean value ("relative"); "primary" names each task's first
    configured metric (what plot_curves draws)."""
    levels = [float(level) for level in levels]
    for level in levels:
        check_level(level)
    if levels != sorted(levels) or len(set(levels)) != len(levels):
        raise UserError(f"robustness levels {levels} must be distinct and ascending")
    loader = build_loader(cfg, data, split, device=device)
    dataset = data.datasets[split]
    modalities = list(model.encoders)

    def metrics(change=None) -> dict:
        """Score the split with every batch passed through `change(batch, batch_number)` first."""
        batches = loader if change is None else (change(batch, n) for n, batch in enumerate(loader))
        return score(predict(model, batches, device, precision), data.tasks)

    def without(modality):
        return lambda batch, n: {**batch, "present": {**batch["present"], modality: torch.zeros_like(
            batch["present"][modality])}}

    def noisy_images(kind, level):
        return lambda batch, n: {**batch, "image": corrupt_images(
            batch["image"], kind, level, torch.Generator().manual_seed(stable_seed(seed, kind, level, n)))}

    def noisy_texts(kind, level):
        # `present` is left as it is: a sample without text stays absent, a text emptied by word_drop is an empty
        # text the model reads ([CLS] [SEP]), not the 'missing' embedding (that is what "missing" measures).
        def change(batch, n):
            texts = [corrupt_text(dataset.texts[i], kind, level, random.Random(f"{seed}/{kind}/{level}/{i}"))
                     for i in batch["index"].tolist()]
            return {**batch, "text": tokenise(texts, data.tokenizer, cfg.encoder.text.get("max_length", 64))}
        return change

    clean = metrics()
    result = {"clean": clean, "missing": {m: metrics(without(m)) for m in modalities}, "corruptions": {},
              "primary": {task.name: task.metrics[0] for task in data.tasks}}
    kinds = [(kind, noisy_images) for kind in IMAGE_CORRUPTIONS if "image" in modalities]
    kinds += [(kind, noisy_texts) for kind in TEXT_CORRUPTIONS if "text" in modalities]
    for kind, corrupted in kinds:
        per_level = [metrics(corrupted(kind, level)) for level in levels]
        auc = {task: {name: area_under_curve(levels, [m[task][name] for m in per_level])
                      for name in values if name != "count"} for task, values in clean.items()}
        relative = {task: {name: relative_robustness(clean[task][name], value) for name, value in values.items()}
                    for task, values in auc.items()}
        result["corruptions"][kind] = {"levels": levels, "metrics": per_level, "auc": auc, "relative": relative}
    return result


def tokenise(texts: list[str], tokenizer, max_length: int) -> dict[str, Tensor]:
    """Texts -> the batch's `text` entry, tokenised as ManifestDataset does and padded as collate does."""
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return pad_token_ids(ids, tokenizer.pad_token_id)


def area_under_curve(levels, values) -> float:
    """Trapezoid area under values(level), divided by the level range: a flat curve at v gives v."""
    levels, values = [float(x) for x in levels], [float(y) for y in values]
    if len(levels) == 1 or levels[-1] == levels[0]:
        return values[0]
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(levels, levels[1:], values, values[1:]))
    return area / (levels[-1] - levels[0])


def relative_robustness(clean, curve_auc) -> float:
    """AUC / clean value: 1 = unaffected; below 1 = worse for higher-is-better metrics (above 1 for mae, loss)."""
    return float("nan") if clean == 0 or math.isnan(clean) else curve_auc / clean


def plot_curves(result: dict, path: Path) -> None:
    """A PNG: one panel per corruption (x = level, y = each task's primary metric, its clean value dotted) and,
    under them, one legend entry per task with its clean value and its value with each modality missing.
    `result` is what evaluate_robustness returns or robustness.json holds (where an undefined metric is null)."""
    primary, kinds = result["primary"], list(result["corruptions"])
    columns = max(1, min(3, len(kinds)))
    rows = max(1, math.ceil(len(kinds) / columns))
    # A Figure of its own, not pyplot: no global state, no GUI backend, nothing left open after the save.
    figure = Figure(figsize=(4.2 * columns, 3.0 * rows + 0.9 + 0.25 * len(primary)), dpi=100, layout="constrained")
    figure.suptitle("robustness: each task's primary metric vs corruption level (0 = clean; dotted: the clean value)")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, kind in zip(axes, kinds):
        draw_panel(ax, kind, result["corruptions"][kind], primary, result["clean"])
    for ax in axes[len(kinds):]:
        ax.set_axis_off()
    entries = []
    for number, (task, metric) in enumerate(primary.items()):
        values = [f"clean {number_text(result['clean'][task][metric])}"]
        values += [f"{m} missing {number_text(v[task][metric])}" for m, v in result["missing"].items()]
        entries.append(Line2D([], [], color=f"C{number}", marker="o", linewidth=2,
                              label=f"{task} ({metric}): " + ", ".join(values)))
    figure.legend(handles=entries, loc="outside lower center", frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")


def draw_panel(ax, kind: str, curve: dict, primary: dict, clean: dict) -> None:
    """One corruption: each task's primary metric per level (a gap where it is undefined), its clean value dotted."""
    levels = curve["levels"]
    for number, (task, metric) in enumerate(primary.items()):
        values = [as_float(m[task][metric]) for m in curve["metrics"]]
        ax.plot(levels, values, color=f"C{number}", marker="o", linewidth=2, label=task)
        ax.axhline(as_float(clean[task][metric]), color=f"C{number}", linestyle=":", linewidth=1)
    finite = [as_float(m[t][name]) for m in curve["metrics"] for t, name in primary.items()]
    finite = [v for v in finite if math.isfinite(v)]
    if finite and 0 <= min(finite) and max(finite) <= 1:  # scores in 0..1 (accuracy, F1, AUROC): the whole range
        ax.set_ylim(-0.02, 1.02)
    ax.set_title(kind)
    ax.set_xlabel("corruption level")
    ax.set_ylabel(", ".join(dict.fromkeys(primary.values())))
    ax.set_xticks(levels)
    ax.grid(True, color="0.9")


def as_float(value) -> float:
    return math.nan if value is None else float(value)


def number_text(value) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.3f}"
