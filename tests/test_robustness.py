"""Robustness evaluation: the image and text corruptions, the curve summaries, and a whole evaluation of a trained
checkpoint (clean = level 0 = the metrics recorded at training time; dropping the words hurts the text task)."""

import json
import math
import random
import string
from collections import Counter

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from PIL import Image

from mtmm.build import build_model
from mtmm.data.build import build_data
from mtmm.checkpoint import load_checkpoint
from mtmm.errors import UserError
from mtmm.records import clean
from mtmm.robustness import (LEVELS, NEIGHBOURS, TYPO_RATE_MAX, area_under_curve, corrupt_images, corrupt_text,
                             evaluate_robustness, plot_curves, relative_robustness)
from mtmm.train import train

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: more threads cost more than they save, and far more on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


WORDS = ("what", "a", "lovely", "yellow", "circle", "i", "hate", "it", "nothing", "special", "here")


def images(seed: int = 0, batch: int = 4, side: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, side, side), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def high_frequency_energy(batch: torch.Tensor) -> float:
    """Mean squared difference between horizontal and vertical neighbours."""
    x = batch.float()
    return float((x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean())


def long_text(n: int = 3000, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


# --- images -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gaussian_noise", "blur"])
def test_image_corruption_level_0_is_identity_and_uint8_stays_uint8(kind):
    batch = images()
    assert torch.equal(corrupt_images(batch, kind, 0.0, generator()), batch)
    out = corrupt_images(batch, kind, 0.6, generator())
    assert out.dtype == torch.uint8 and out.shape == batch.shape and not torch.equal(out, batch)
    assert torch.equal(out, corrupt_images(batch, kind, 0.6, generator()))  # same seed, same pixels


def test_noise_std_grows_with_level_as_specified():
    grey = torch.full((8, 3, 64, 64), 128, dtype=torch.uint8)
    stds = [(corrupt_images(grey, "gaussian_noise", level, generator()).float() - 128).std().item() for level in LEVELS]
    assert stds[0] == 0 and all(a < b for a, b in zip(stds, stds[1:]))
    assert stds[1] == pytest.approx(0.2 * 128, rel=0.05)  # little clipping yet: std = level * 128
    assert stds[-1] < 128  # clipped to 0..255 at the top level
    other = corrupt_images(grey, "gaussian_noise", 0.6, generator(1))
    assert not torch.equal(other, corrupt_images(grey, "gaussian_noise", 0.6, generator(0)))


def test_blur_removes_high_frequencies_monotonically_and_keeps_flat_images():
    batch = images(side=48)
    energies = [high_frequency_energy(corrupt_images(batch, "blur", level, generator())) for level in LEVELS]
    assert all(a > b for a, b in zip(energies, energies[1:])), energies
    assert energies[-1] < 0.05 * energies[0]
    flat = torch.full((2, 3, 5, 7), 77, dtype=torch.uint8)  # smaller than the kernel: edges are replicated
    assert torch.equal(corrupt_images(flat, "blur", 1.0, generator()), flat)


def test_unknown_corruptions_and_levels_are_refused():
    with pytest.raises(UserError, match="gaussian_noise, blur"):
        corrupt_images(images(), "jpeg", 0.5, generator())
    with pytest.raises(UserError, match="char_swap, typo, word_drop"):
        corrupt_text("hello", "shout", 0.5, random.Random(0))
    with pytest.raises(UserError, match="outside 0..1"):
        corrupt_text("hello", "typo", 1.5, random.Random(0))


# --- texts ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["char_swap", "typo", "word_drop"])
def test_text_corruption_level_0_is_identity_and_same_seed_same_text(kind):
    text = "  Here is a  yellow\tcircle, i LOVE it!  "
    assert corrupt_text(text, kind, 0.0, random.Random(0)) == text
    words = long_text(200)
    first = corrupt_text(words, kind, 0.5, random.Random("seed"))
    assert first == corrupt_text(words, kind, 0.5, random.Random("seed")) != words
    assert first != corrupt_text(words, kind, 0.5, random.Random("other seed"))


def test_word_drop_drops_all_at_1_and_about_half_at_0_5():
    text = long_text()
    assert corrupt_text(text, "word_drop", 1.0, random.Random(0)) == ""
    kept = corrupt_text(text, "word_drop", 0.5, random.Random(0)).split()
    assert 0.46 < len(kept) / 3000 < 0.54
    assert set(kept) <= set(WORDS)


def test_char_swap_only_reorders_characters_inside_words():
    text = "the  yellow\tcircle, what a lovely sight!\n" * 100
    swapped = corrupt_text(text, "char_swap", 1.0, random.Random(0))
    assert Counter(swapped) == Counter(text) and swapped != text
    assert [i for i, c in enumerate(swapped) if c.isspace()] == [i for i, c in enumerate(text) if c.isspace()]
    # At level 1 every word with two different neighbouring characters is changed ("a" cannot be).
    changed = [a != b for a, b in zip(text.split(), swapped.split())]
    assert sum(changed) == len(changed) - 100
    some = corrupt_text(long_text(), "char_swap", 0.4, random.Random(0)).split()
    swappable = [w for w in long_text().split() if len(w) > 1]
    assert 0.35 < sum(a != b for a, b in zip(long_text().split(), some)) / len(swappable) < 0.45


@pytest.mark.parametrize("level", [0.4, 1.0])
def test_typo_replaces_the_expected_share_of_letters_by_keyboard_neighbours(level):
    text = long_text().title() + " 123, ok!"
    typed = corrupt_text(text, "typo", level, random.Random(0))
    assert len(typed) == len(text)
    letters = [(a, b) for a, b in zip(text, typed) if a in string.ascii_letters]
    changed = [(a, b) for a, b in letters if a != b]
    assert len(changed) / len(letters) == pytest.approx(level * TYPO_RATE_MAX, abs=0.02)
    assert all(b.lower() in NEIGHBOURS[a.lower()] and a.isupper() == b.isupper() for a, b in changed)
    assert [a for a in text if a not in string.ascii_letters] == [b for b in typed if b not in string.ascii_letters]


def test_keyboard_neighbours_are_symmetric_and_local():
    assert set(NEIGHBOURS["s"]) == set("adwezx") and set(NEIGHBOURS["q"]) == set("wa")
    assert len(NEIGHBOURS) == 26
    assert all(a in NEIGHBOURS[b] for a, near in NEIGHBOURS.items() for b in near)


# --- summaries --------------------------------------------------------------------------------------------------

def test_area_under_curve_and_relative_robustness():
    assert area_under_curve(LEVELS, [0.7] * 6) == pytest.approx(0.7)
    assert area_under_curve(LEVELS, [1 - level for level in LEVELS]) == pytest.approx(0.5)
    assert area_under_curve([0.2, 0.6], [1.0, 0.0]) == pytest.approx(0.5)  # normalised by the level range
    assert area_under_curve([0.0, 0.5, 1.0], [1.0, 1.0, 0.0]) == pytest.approx(0.75)
    assert relative_robustness(0.8, 0.4) == pytest.approx(0.5)
    assert math.isnan(relative_robustness(0.0, 0.4))


# --- a trained model --------------------------------------------------------------------------------------------

OVERRIDES = ["data.source.train=300", "data.source.val=32", "data.source.test=64", "data.batch_size=32",
             "data.eval_batch_size=24", "trainer.epochs=3", "trainer.log_every=50", "trainer.progress=false",
             "device=cpu", "encoder.image.channels=[8,16,32]"]
SMALL_TEXT = ["encoder.text.hidden_size=64", "encoder.text.num_layers=1", "encoder.text.intermediate_size=128"]


def compose_cfg(cache, *overrides: str):
    with initialize_config_module("mtmm.conf", version_base="1.3"):
        return compose("train", overrides=[f"data.source.cache_dir={cache}", *OVERRIDES, *overrides])


def restore(checkpoint, split: str = "test"):
    """Data and model from a checkpoint alone, as mtmm-eval rebuilds them."""
    state = load_checkpoint(checkpoint)
    cfg = OmegaConf.create(state["config"])
    data = build_data(cfg, splits=(split,), saved=state["data"])
    model = build_model(cfg, data.tasks, data.tokenizer, checkpoint=state)
    model.load_state_dict(state["model"])
    return cfg, data, model


@pytest.fixture(scope="module")
def trained(shapes_cache, tmp_path_factory):
    """A text-sentiment model (image and text encoders) trained 3 epochs, and its robustness on the test split
    (3 batches of 24, 24, 16: padding and per-batch seeds are exercised)."""
    run = tmp_path_factory.mktemp("robust-run")
    train(compose_cfg(shapes_cache, "tasks=txt", *SMALL_TEXT), run_dir=run)
    cfg, data, model = restore(run / "checkpoints" / "best.pt")
    result = evaluate_robustness(model, cfg, data, "test", torch.device("cpu"), "fp32")
    return {"run": run, "cfg": cfg, "data": data, "model": model, "result": result}


def test_level_0_reproduces_the_clean_metrics_and_those_recorded_at_training(trained):
    result = trained["result"]
    summary = json.loads((trained["run"] / "summary.json").read_text())
    assert json.loads(json.dumps(clean(result["clean"]))) == summary["best"]["test"]
    assert set(result["corruptions"]) == {"gaussian_noise", "blur", "char_swap", "typo", "word_drop"}
    for kind, curve in result["corruptions"].items():
        assert curve["levels"] == list(LEVELS) and len(curve["metrics"]) == len(LEVELS)
        assert curve["metrics"][0] == result["clean"], kind
        assert set(curve["auc"]) == set(curve["relative"]) == {"txt", "mean"}
        assert "count" not in curve["auc"]["txt"] and set(curve["auc"]["txt"]) >= {"accuracy", "macro_f1", "loss"}
    assert result["primary"] == {"txt": "accuracy"}


def test_missing_modalities_and_dropped_words_hurt_the_text_task(trained):
    result = trained["result"]
    assert set(result["missing"]) == {"image", "text"}
    assert result["missing"]["text"]["txt"]["accuracy"] < result["clean"]["txt"]["accuracy"] - 0.2
    words = result["corruptions"]["word_drop"]
    assert words["metrics"][-1]["txt"]["accuracy"] < result["clean"]["txt"]["accuracy"] - 0.2
    assert words["relative"]["txt"]["accuracy"] < 1
    accuracy = [m["txt"]["accuracy"] for m in words["metrics"]]
    assert words["auc"]["txt"]["accuracy"] == pytest.approx(area_under_curve(LEVELS, accuracy))


def test_same_seed_same_metrics_whichever_levels_are_asked_for(trained):
    t = trained
    again = evaluate_robustness(t["model"], t["cfg"], t["data"], "test", torch.device("cpu"), "fp32", levels=(0.0, 0.6))
    for kind, curve in again["corruptions"].items():
        assert curve["metrics"][1] == t["result"]["corruptions"][kind]["metrics"][3], kind
    with pytest.raises(UserError, match="ascending"):
        evaluate_robustness(t["model"], t["cfg"], t["data"], "test", torch.device("cpu"), "fp32", levels=(0.5, 0.0))


def test_only_the_modalities_the_model_has(shapes_cache):
    cfg = compose_cfg(shapes_cache, "tasks=txt", "encoder/text=none")
    data = build_data(cfg, splits=("test",))
    model = build_model(cfg, data.tasks, data.tokenizer)
    result = evaluate_robustness(model, cfg, data, "test", torch.device("cpu"), "fp32", levels=(0.0, 1.0))
    assert set(result["missing"]) == {"image"} and set(result["corruptions"]) == {"gaussian_noise", "blur"}


def test_plot_is_a_readable_png(trained, tmp_path):
    path = tmp_path / "plots" / "robustness.png"
    plot_curves(trained["result"], path)
    with Image.open(path) as image:
        assert image.format == "PNG" and 800 <= image.width <= 2000 and 400 <= image.height <= 1500
        colours = {colour for _, colour in image.convert("RGB").getcolors(1 << 20)}
    assert (31, 119, 180) in colours  # the first task's curve was drawn
