"""Tiny random Hugging Face and timm models saved the way users have them on disk (save_pretrained folders with
their processor / tokenizer, a timm weight file), for the backbone tests: nothing is downloaded."""

from pathlib import Path

import torch

SIDE = 32  # the processors' input side: the shapes images (64 px) are resized to it
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
WORDS = "a the red green blue yellow purple orange circle square triangle star cross small large on white".split()


def tokenizer():
    from mtmm.data.tokenizer import train_wordpiece
    return train_wordpiece([" ".join(WORDS)], vocab_size=200)


def vision_model(kind: str, folder: Path) -> Path:
    """A 2-layer vision model of `kind` with its image processor, saved in folder/kind."""
    import transformers as t
    path = folder / kind
    vit = dict(image_size=SIDE, patch_size=8, **SMALL)
    processor = t.ViTImageProcessor(size={"height": SIDE, "width": SIDE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    if kind == "vit":
        model = t.ViTModel(t.ViTConfig(**vit))
    elif kind == "deit":
        model = t.DeiTModel(t.DeiTConfig(**vit))
    elif kind == "dinov2":
        model = t.Dinov2Model(t.Dinov2Config(**vit))
    elif kind == "convnext":
        model = t.ConvNextModel(t.ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2))
        processor = t.ConvNextImageProcessor(size={"shortest_edge": SIDE}, crop_pct=0.875, image_mean=[0.4] * 3,
                                             image_std=[0.3] * 3, resample=3)
    elif kind == "swin":
        model = t.SwinModel(t.SwinConfig(image_size=SIDE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                         window_size=4))
    else:
        raise ValueError(kind)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def dual_tower(kind: str, folder: Path) -> Path:
    """A tiny CLIP or SigLIP checkpoint (both towers) with its image processor and a tokenizer, in folder/kind."""
    import transformers as t
    path = folder / kind
    words = tokenizer()
    text = dict(vocab_size=len(words), max_position_embeddings=80, pad_token_id=words.pad_token_id, **SMALL)
    vision = dict(image_size=SIDE, patch_size=8, **SMALL)
    if kind == "clip":
        text.update(eos_token_id=words.sep_token_id, bos_token_id=words.cls_token_id)
        model = t.CLIPModel(t.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        processor = t.CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    else:
        model = t.SiglipModel(t.SiglipConfig(text_config=text, vision_config=vision))
        processor = t.SiglipImageProcessor(size={"height": SIDE, "width": SIDE})
    model.save_pretrained(path)
    processor.save_pretrained(path)
    words.save_pretrained(path)
    return path


def text_model(folder: Path) -> Path:
    """A 2-layer BERT with its tokenizer, in folder/bert."""
    import transformers as t
    path = folder / "bert"
    words = tokenizer()
    t.BertModel(t.BertConfig(vocab_size=len(words), pad_token_id=words.pad_token_id, **SMALL)).save_pretrained(path)
    words.save_pretrained(path)
    return path


def timm_weights(name: str, folder: Path) -> Path:
    """The state dict of timm's `name` (random init), saved as users download it: one safetensors file."""
    import timm
    from safetensors.torch import save_file
    model = timm.create_model(name, pretrained=False)
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def uint8_images(count: int = 2, side: int = SIDE) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
