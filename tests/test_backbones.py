"""Pretrained backbones, offline: Hugging Face vision models (ViT, DeiT, DINOv2, ConvNeXt, Swin, the vision tower of
CLIP / SigLIP), timm models, HF text models and the text towers, both towers of one checkpoint (backbone=clip|siglip),
LoRA / IA3 through peft, layer-wise learning-rate decay and gradient checkpointing. Every model is a tiny random one
the test saves itself (tests/backbone_models.py)."""

import json
import shutil

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from mtmm.build import build_optimizer, layer_scales
from mtmm.errors import UserError
from mtmm.eval import evaluate_checkpoint
from mtmm.models.image_hf import HFImageEncoder
from mtmm.models.image_timm import TimmEncoder
from mtmm.models.presets import fill_image_preprocessing
from mtmm.train import train
from tests import backbone_models as tiny
from tests.conftest import TINY, assert_processes_agree

FAST = [*TINY, "trainer.epochs=1", "data.source.train=64", "data.source.val=32", "data.source.test=32"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("backbones")
    return folder


def compose_run(folder, *overrides):
    with initialize_config_module("mtmm.conf", version_base="1.3"):
        return compose("train", overrides=[f"data.source.cache_dir={folder / 'data'}", *FAST, *overrides])


def preprocessing(target: str, name: str, **given) -> dict:
    keys = {key: given.get(key) for key in ("size", "crop", "mean", "std", "interpolation")}
    cfg = OmegaConf.create({"encoder": {"image": {"_target_": target, "name": name, **keys}}})
    fill_image_preprocessing(cfg)
    return OmegaConf.to_container(cfg.encoder.image)


@pytest.mark.parametrize("kind", ["vit", "deit", "dinov2", "convnext", "swin"])
def test_hf_vision_models_give_pooled_features_and_tokens(models, kind):
    path = tiny.vision_model(kind, models)
    image = preprocessing("mtmm.models.image_hf.HFImageEncoder", str(path))
    if kind == "convnext":  # its processor: shortest edge / crop_pct, then the crop; bicubic; its own mean and std
        assert (image["size"], image["crop"], image["interpolation"]) == (36, 32, "bicubic")
        assert image["mean"] == pytest.approx([0.4] * 3) and image["std"] == pytest.approx([0.3] * 3)
    else:
        assert (image["size"], image["crop"], image["mean"]) == (32, 32, [0.5] * 3)
    for pooling in ("pooler", "cls", "mean"):
        encoder = HFImageEncoder(str(path), pooling=pooling, size=image["size"], crop=image["crop"],
                                 mean=image["mean"], std=image["std"]).eval()
        features = encoder(tiny.uint8_images(2, image["crop"]))
        assert features.pooled.shape == (2, encoder.dim) and features.tokens.shape[0::2] == (2, encoder.dim)
        assert features.tokens.shape[1] > 1 and features.mask.all() and torch.isfinite(features.pooled).all()
    if kind in ("vit", "deit", "dinov2"):  # cls is the first token; mean the tokens' mean (before mtmm's norm)
        pooled, tokens = encoder.encode(tiny.uint8_images(2))
        assert torch.allclose(pooled, tokens.mean(1))


def test_a_rebuilt_hf_image_encoder_needs_no_files_and_gives_the_same_features(models):
    path = tiny.vision_model("vit", models / "rebuilt")
    encoder = HFImageEncoder(str(path), mean=[0.5] * 3, std=[0.5] * 3, size=32).eval()
    saved, weights = encoder.config_json(), encoder.state_dict()
    shutil.rmtree(path)
    rebuilt = HFImageEncoder(str(path), mean=[0.5] * 3, std=[0.5] * 3, size=32, saved_config=saved, pretrained=False)
    rebuilt.load_state_dict(weights)
    images = tiny.uint8_images()
    assert torch.equal(rebuilt.eval()(images).pooled, encoder(images).pooled)


def test_hf_vision_model_trains_with_token_fusion_and_eval_needs_no_model_files(models, tmp_path):
    """encoder/image=hf with middle fusion (its tokens); then the model folder is gone and mtmm-eval still gives the
    test metrics training recorded, from the checkpoint alone (architecture in image_config, preprocessing in the
    saved config)."""
    path = tiny.vision_model("vit", tmp_path / "model")
    train(compose_run(tmp_path, "encoder/image=hf", f"encoder.image.name={path}", "fusion=middle"),
          run_dir=tmp_path / "run")
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert (saved.encoder.image.size, saved.encoder.image.crop, list(saved.encoder.image.std)) == (32, 32, [0.5] * 3)
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    assert json.loads(torch.load(best, weights_only=True)["image_config"])["model_type"] == "vit"
    shutil.rmtree(path)
    metrics = evaluate_checkpoint(best, run_dir=tmp_path / "eval", device="cpu")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert metrics["img"]["accuracy"] == pytest.approx(summary["best"]["test"]["img"]["accuracy"])


@pytest.mark.parametrize("kind, fusion", [("clip", "cross_attention"), ("siglip", "film")])
def test_both_towers_of_one_checkpoint_train_and_evaluate(models, tmp_path, kind, fusion):
    path = tiny.dual_tower(kind, tmp_path / "model")
    train(compose_run(tmp_path, f"backbone={kind}", f"backbone.name={path}", f"fusion={fusion}",
                      "encoder.text.max_length=16"), run_dir=tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert json.loads(state["image_config"])["model_type"] == kind  # the whole checkpoint's config: the
    assert json.loads(state["text_config"])["model_type"] == kind   # same tower is taken again when rebuilt
    assert any(name.startswith("encoders.image.model.") for name in state["model"])
    assert any(name.startswith("encoders.text.model.") for name in state["model"])
    shutil.rmtree(path)
    metrics = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", run_dir=tmp_path / "eval",
                                  device="cpu")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for task in ("img", "txt"):
        assert metrics[task]["accuracy"] == pytest.approx(summary["best"]["test"][task]["accuracy"])


def test_timm_model_loads_a_local_weight_file_and_its_pretrained_config(models):
    from safetensors.torch import load_file
    weights = tiny.timm_weights("test_vit", models)
    image = preprocessing("mtmm.models.image_timm.TimmEncoder", "test_vit")
    assert (image["crop"], image["size"], image["interpolation"]) == (160, int(160 / 0.95), "bicubic")
    encoder = TimmEncoder("test_vit", weights=str(weights), **{k: image[k] for k in ("size", "crop", "mean", "std")})
    saved = load_file(str(weights))
    for name, tensor in encoder.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name  # the file's weights, not a fresh init
    features = encoder.eval()(tiny.uint8_images(2, 160))
    assert features.pooled.shape == (2, 64) and features.tokens.shape[1:] == (101, 64)


def test_timm_convnet_tokens_are_its_feature_map_cells(models):
    encoder = TimmEncoder("test_convnext", mean=[0.5] * 3, std=[0.5] * 3, crop=64).eval()
    features = encoder(tiny.uint8_images(2, 64))
    assert features.tokens.shape[0] == 2 and features.tokens.shape[2] == encoder.dim and features.tokens.shape[1] > 1


def test_lora_trains_only_adapters_and_the_base_weights_do_not_change(models, tmp_path):
    """timm ViT with LoRA rank 4: after training, every base weight in best.pt equals the file's, the adapters moved,
    and mtmm-eval of the checkpoint rebuilds the same adapters."""
    from safetensors.torch import load_file
    weights = tiny.timm_weights("test_vit", tmp_path)
    train(compose_run(tmp_path, "encoder/image=timm", "encoder.image.name=test_vit", f"encoder.image.weights={weights}",
                      "encoder.image.size=32", "encoder.image.crop=32", "encoder.image.lora.rank=4",
                      "optim.lr=1e-2"), run_dir=tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]
    base = load_file(str(weights))
    prefix = "encoders.image.model."
    adapters = [name for name in state if name.startswith(prefix) and "lora_" in name]
    assert adapters and all(".attn.qkv." in name for name in adapters)  # timm's attention projection
    for name, tensor in state.items():
        if name.startswith(prefix) and "lora_" not in name:
            original = name[len(prefix):].replace(".base_layer.", ".")
            assert torch.equal(tensor, base[original]), name
    lora_b = [state[name] for name in adapters if "lora_B" in name]
    assert any(tensor.abs().sum() > 0 for tensor in lora_b)  # initialised at zero; training moved them
    metrics = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", run_dir=tmp_path / "eval",
                                  device="cpu")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert metrics["img"]["accuracy"] == pytest.approx(summary["best"]["test"]["img"]["accuracy"])


def test_ia3_on_a_hf_text_model_trains_only_its_scaling_vectors(models, tmp_path):
    path = tiny.text_model(tmp_path)
    cfg = compose_run(tmp_path, "encoder/text=hf", f"encoder.text.name={path}", "encoder.text.ia3.enabled=true",
                      "tasks=txt", "encoder/image=none")
    from mtmm.run import setup
    run = setup(cfg)
    trainable = [name for name, p in run.model.encoders["text"].named_parameters() if p.requires_grad]
    assert trainable and all("ia3_l" in name or name.startswith("norm.") for name in trainable)
    assert any("output.dense.ia3_l" in name for name in trainable)  # the feed-forward output is scaled too
    assert not run.model.encoders["text"].frozen  # it trains, so its outputs are not cached as a frozen one's


def test_adapter_errors_name_the_key(models):
    with pytest.raises(UserError, match=r"encoder.image.lora.target_modules: \['nope'\] name no linear layer"):
        TimmEncoder("test_vit", mean=[0.5] * 3, std=[0.5] * 3, crop=160, lora={"rank": 2, "target_modules": ["nope"]})
    with pytest.raises(UserError, match="lora.rank=0"):
        TimmEncoder("test_vit", mean=[0.5] * 3, std=[0.5] * 3, crop=160, lora={"rank": 0})
    with pytest.raises(UserError, match="choose one adapter"):
        TimmEncoder("test_vit", mean=[0.5] * 3, std=[0.5] * 3, crop=160, lora={"rank": 2}, ia3={"enabled": True})


def test_missing_models_fail_fast_saying_what_to_put_where(tmp_path):
    with pytest.raises(UserError, match="could not load the vision model .* offline.*encoder.image.name"):
        HFImageEncoder(str(tmp_path / "absent"), mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(UserError, match="no image processor"):
        preprocessing("mtmm.models.image_hf.HFImageEncoder", str(tmp_path / "absent"))
    with pytest.raises(UserError, match="is not a timm model"):
        TimmEncoder("no_such_net", mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(UserError, match=r"weights=.*absent.safetensors: no such file"):
        TimmEncoder("test_vit", weights=str(tmp_path / "absent.safetensors"), mean=[0.5] * 3, std=[0.5] * 3, crop=160)


def test_layer_decay_scales_each_block_and_the_embeddings(models, tmp_path):
    names = ["encoders.text.model.embeddings.word_embeddings.weight", "encoders.text.model.encoder.layer.0.x.weight",
             "encoders.text.model.encoder.layer.1.x.weight", "encoders.text.norm.weight",
             "encoders.image.body.0.weight", "fusion.proj.weight"]
    scales = layer_scales(names, 0.5)
    assert scales == {names[0]: 0.125, names[1]: 0.25, names[2]: 0.5}  # the rest: 1
    path = tiny.text_model(tmp_path)
    cfg = compose_run(tmp_path, "encoder/text=hf", f"encoder.text.name={path}", "optim.layer_decay=0.5",
                      "optim.encoder_lr=1e-3", "optim.lr=1e-2")
    from mtmm.build import build_model
    from mtmm.data.build import build_data
    from mtmm.weighting.static import StaticWeighting
    data = build_data(cfg, splits=("train",))
    model = build_model(cfg, data.tasks, data.tokenizer)
    optimizer = build_optimizer(cfg, model, StaticWeighting({"img": 1.0, "txt": 1.0}))
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["encoders.text.model.encoder.layer.1.attention.self.query.weight"])] == pytest.approx(5e-4)
    assert lr_of[id(named["encoders.text.model.encoder.layer.0.attention.self.query.weight"])] == pytest.approx(2.5e-4)
    assert lr_of[id(named["encoders.text.model.embeddings.word_embeddings.weight"])] == pytest.approx(1.25e-4)
    assert lr_of[id(named["encoders.text.norm.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["encoders.image.body.0.weight"])] == pytest.approx(1e-3)  # the small CNN: no blocks
    with pytest.raises(UserError, match="optim.layer_decay=1.5"):
        layer_scales(names, 1.5)


def test_gradient_checkpointing_gives_the_same_gradients(models):
    path = tiny.vision_model("vit", models / "checkpointing")
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        encoder = HFImageEncoder(str(path), mean=[0.5] * 3, std=[0.5] * 3, size=32,
                                 gradient_checkpointing=checkpointing).train()
        encoder(tiny.uint8_images()).pooled.square().sum().backward()
        gradients.append({n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        assert torch.allclose(gradients[0][name], gradients[1][name], atol=1e-6), name


def test_clip_towers_work_with_every_fusion(models):
    """backbone=clip: one training step of every fusion on both towers' features."""
    from mtmm.build import build_model
    from mtmm.data.build import build_data, build_loader
    from tests.test_config import CONF
    path = models / "clip" if (models / "clip").exists() else tiny.dual_tower("clip", models)
    batch = data = None
    for fusion in sorted(p.stem for p in (CONF / "fusion").glob("*.yaml")):
        cfg = compose_run(models, "backbone=clip", f"backbone.name={path}", f"fusion={fusion}",
                          "encoder.text.max_length=16", "data.batch_size=8")
        fill_image_preprocessing(cfg)
        if data is None:  # the data side does not depend on the fusion
            data = build_data(cfg, splits=("train",))
            batch = next(iter(build_loader(cfg, data, "train")))
        model = build_model(cfg, data.tasks, data.tokenizer).train()
        logits = model(batch)
        loss = sum(value.float().square().mean() for value in logits.values())
        loss.backward()
        for modality in ("image", "text"):
            grads = [p.grad for n, p in model.encoders[modality].model.named_parameters() if p.grad is not None]
            assert grads and any(g.abs().sum() > 0 for g in grads), (fusion, modality)


@pytest.mark.parametrize("kind", ["vit", "dinov2", "convnext"])
def test_hf_vision_models_load_their_saved_weights_train_and_evaluate(tmp_path, kind):
    from safetensors.torch import load_file
    path = tiny.vision_model(kind, tmp_path / "model")
    saved = load_file(str(path / "model.safetensors"))
    encoder = HFImageEncoder(str(path), mean=[0.5] * 3, std=[0.5] * 3, size=32)
    # transformers 5 renames legacy keys while loading (encoder.layer.0.attention.attention.query -> layers.0.
    # attention.q_proj), so tensors are matched by value: every saved tensor is one of the encoder's
    loaded = list(encoder.model.state_dict().values())
    assert len(loaded) == len(saved)
    for name, tensor in saved.items():
        assert any(t.shape == tensor.shape and torch.equal(t, tensor) for t in loaded), name
    train(compose_run(tmp_path, "encoder/image=hf", f"encoder.image.name={path}", "tasks=img"),
          run_dir=tmp_path / "run")
    metrics = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", run_dir=tmp_path / "eval",
                                  device="cpu")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert metrics["img"]["loss"] == pytest.approx(summary["best"]["test"]["img"]["loss"], rel=1e-5)


def test_lora_counts_what_peft_counts_and_resumes_exactly_in_bf16(tmp_path):
    """The trainable parameters of a LoRA encoder are peft's own count; a stopped bf16 run resumes to bitwise the
    same weights as an uninterrupted one."""
    import peft
    import timm
    from mtmm.errors import UserError
    from mtmm.loop import StopSignal
    lora = TimmEncoder("test_vit", mean=[0.5] * 3, std=[0.5] * 3, crop=32, lora={"rank": 4, "alpha": 8})
    ours = sum(p.numel() for n, p in lora.model.named_parameters() if p.requires_grad)
    reference = peft.get_peft_model(timm.create_model("test_vit", num_classes=0),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"]))
    assert ours == reference.get_nb_trainable_parameters()[0]
    weights = tiny.timm_weights("test_vit", tmp_path)
    run = ["encoder/image=timm", "encoder.image.name=test_vit", f"encoder.image.weights={weights}",
           "encoder.image.size=32", "encoder.image.crop=32", "encoder.image.lora.rank=4", "device.precision=bf16",
           "trainer.checkpoint_every=1", "tasks=img", "encoder/text=none"]
    train(compose_run(tmp_path / "a", *run), run_dir=tmp_path / "whole")
    calls = iter(range(1000))
    with pytest.MonkeyPatch.context() as patch, pytest.raises(UserError, match="stopped"):
        patch.setattr(StopSignal, "requested", lambda self: next(calls) == 0)  # after the first optimizer step
        train(compose_run(tmp_path / "a", *run), run_dir=tmp_path / "part")
    train(compose_run(tmp_path / "a", *run, f"resume={tmp_path / 'part'}"))
    whole, part = (torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)["model"]
                   for name in ("whole", "part"))
    assert all(torch.equal(part[name], whole[name]) for name in whole)


def test_lora_encoder_under_two_processes_matches_one(tmp_path):
    """DDP over an HF ViT with LoRA (frozen base, adapters trainable): 2 gloo processes give the losses of 1 with
    the same global batch (no dropout, no BatchNorm)."""
    path = tiny.vision_model("vit", tmp_path / "model")
    common = ["encoder/image=hf", f"encoder.image.name={path}", "encoder.image.lora.rank=4", "tasks=img",
              "encoder/text=none", "mtl.dropout=0", "data.batch_size=32"]
    train(compose_run(tmp_path, *common), run_dir=tmp_path / "one")
    train(compose_run(tmp_path, *common, "device.nproc_per_node=2"), run_dir=tmp_path / "two")
    assert_processes_agree(tmp_path / "one", tmp_path / "two", "img")


class Payload:
    """A pickled object that would write a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_weight_file_or_image_config_cannot_run_code(tmp_path):
    """A timm weight file holding pickled objects is refused (timm reads it with weights_only), and a checkpoint
    whose image_config asks for custom code is refused before anything is built."""
    marker = tmp_path / "ran"
    crafted = tmp_path / "evil.pth"
    torch.save({"weight": Payload(marker)}, crafted)
    with pytest.raises(UserError, match=r"weights=.*evil.pth: the weights of test_vit could not be loaded"):
        TimmEncoder("test_vit", weights=str(crafted), mean=[0.5] * 3, std=[0.5] * 3, crop=160)
    assert not marker.exists()
    path = tiny.vision_model("vit", tmp_path / "model")
    encoder = HFImageEncoder(str(path), mean=[0.5] * 3, std=[0.5] * 3, size=32)
    fields = json.loads(encoder.config_json())
    fields["auto_map"] = {"AutoModel": "evil.Model"}
    with pytest.raises(UserError, match="image_config asks for custom code"):
        HFImageEncoder(str(path), mean=[0.5] * 3, std=[0.5] * 3, size=32, saved_config=json.dumps(fields),
                       pretrained=False)
