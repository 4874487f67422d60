"""Encoders, fusions, MLPs, the masked task loss and build_model, on tiny CPU models."""

import shutil
import time

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_module
from transformers import BertConfig, BertModel

from mtmm.build import build_model
from mtmm.data.build import build_data
from mtmm.data.tokenizer import train_wordpiece
from mtmm.errors import UserError
from mtmm.models.features import Features
from mtmm.models.fusion import EarlyFusion, LateFusion, MiddleFusion
from mtmm.models.image import SmallCNN, TorchvisionEncoder
from mtmm.models.mlp import mlp
from mtmm.models.model import MultiTaskModel
from mtmm.models.sharing import HardSharing
from mtmm.models.text import bert_tiny, pretrained
from mtmm.tasks import masked_task_loss

TEXTS = ["a red circle, i love this", "the blue square is awful", "nothing special here at all"]
DIMS = {"image": 16, "text": 8}


def images(batch=2, size=64, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def assert_layer_normalised(pooled: torch.Tensor) -> None:
    # std is a little under 1 where the raw features' variance is not large against LayerNorm's eps.
    torch.testing.assert_close(pooled.mean(-1), torch.zeros(len(pooled)), atol=1e-4, rtol=0)
    torch.testing.assert_close(pooled.std(-1, unbiased=False), torch.ones(len(pooled)), atol=0.05, rtol=0)


@pytest.mark.parametrize("channels, dim, cells", [((32, 64, 128), 128, 64), ((8, 16), 16, 256)])
def test_small_cnn_features(channels, dim, cells):
    torch.manual_seed(0)
    cnn = SmallCNN(channels=list(channels))
    features = cnn(images())
    assert cnn.dim == dim
    assert features.pooled.shape == (2, dim) and features.tokens.shape == (2, cells, dim)
    assert features.mask.shape == (2, cells) and features.mask.dtype == torch.bool and features.mask.all()
    assert_layer_normalised(features.pooled)
    torch.testing.assert_close(features.pooled, cnn.norm(features.tokens.mean(1)))


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_encoder_stays_in_eval_mode(freeze):
    torch.manual_seed(0)
    cnn = SmallCNN(channels=[8, 16], freeze=freeze)
    assert [p.requires_grad for p in cnn.body.parameters()] == [not freeze] * len(list(cnn.body.parameters()))
    assert all(p.requires_grad for p in cnn.norm.parameters())  # the LayerNorm after pooling always adapts
    model = MultiTaskModel({"image": cnn}, EarlyFusion({"image": 16}), HardSharing(16, ["t"], [8]), {"t": mlp(8, [], 2)})
    model.eval()
    model.train()
    assert model.training and model.shared.training and model.heads["t"].training
    assert cnn.training is (not freeze) and cnn.body[1].training is (not freeze)
    batchnorm = cnn.body[1]
    before = (batchnorm.running_mean.clone(), batchnorm.running_var.clone())
    model({"image": images(), "present": {"image": torch.ones(len(images()), dtype=torch.bool)}})["t"].sum().backward()
    unchanged = torch.equal(batchnorm.running_mean, before[0]) and torch.equal(batchnorm.running_var, before[1])
    assert unchanged is freeze
    assert all((p.grad is None) is freeze for p in cnn.body.parameters())


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def loaded_resnet(resnet_weights):
    return TorchvisionEncoder(name="resnet18", weights=str(resnet_weights[0]), size=64)


@pytest.mark.parametrize("size, freeze", [(32, False), (64, True)])
def test_torchvision_encoder_features(size, freeze):
    torch.manual_seed(0)
    encoder = TorchvisionEncoder(name="resnet18", size=size, freeze=freeze)
    features = encoder(images(size=size))
    cells = (size // 32) ** 2
    assert encoder.dim == 512 and features.pooled.shape == (2, 512) and features.tokens.shape == (2, cells, 512)
    assert_layer_normalised(features.pooled)
    assert encoder.frozen is freeze and all(p.requires_grad is not freeze for p in encoder.body.parameters())


def test_torchvision_encoder_loads_state_dict_file(resnet_weights, loaded_resnet):
    path, state = resnet_weights
    assert torch.equal(loaded_resnet.body[0].weight, state["conv1.weight"])
    assert torch.equal(loaded_resnet.body[7][1].conv2.weight, state["layer4.1.conv2.weight"])
    # pretrained=False (restoring from a checkpoint) does not read the file.
    assert not torch.equal(TorchvisionEncoder(weights=str(path), size=64, pretrained=False).body[0].weight,
                           state["conv1.weight"])


def test_torchvision_encoder_keeps_loaded_batchnorm_statistics(resnet_weights, loaded_resnet):
    # Building the encoder (its width probe included) must not change the loaded running statistics.
    body = loaded_resnet.body.state_dict()
    expected = {k: v for k, v in resnet_weights[1].items() if not k.startswith("fc.")}
    assert len(body) == len(expected)  # same order: conv1, bn1, layer1..layer4
    changed = [k for (k, a), b in zip(expected.items(), body.values()) if not torch.equal(a, b)]
    assert changed == []


@pytest.mark.parametrize("name, weights, named", [
    ("resnet18", "{tmp}/nope.pth", "no such file {tmp}/nope.pth"),
    ("resnet_nope", None, "'resnet_nope' is not a torchvision"),
    # A weight name is looked up in the torch hub cache (TORCH_HOME) and never downloaded.
    ("resnet18", "IMAGENET1K_V1", "{tmp}/hub/checkpoints/resnet18-f37072fd.pth is missing"),
])
def test_torchvision_bad_name_or_weights(tmp_path, monkeypatch, name, weights, named):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as error:
        TorchvisionEncoder(name=name, weights=weights and weights.format(tmp=tmp_path), size=64)
    assert named.format(tmp=tmp_path) in str(error.value)
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece(TEXTS)


def tiny_bert(tokenizer, pooling="mean", **kwargs):
    torch.manual_seed(0)
    return bert_tiny(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, pooling=pooling,
                     **kwargs).eval()


def test_bert_tiny_features(tokenizer):
    encoder = tiny_bert(tokenizer)
    text = tokenizer(TEXTS, padding=True, return_tensors="pt")
    features = encoder({"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]})
    length = text["input_ids"].shape[1]
    assert encoder.dim == 32 and encoder.model.config.vocab_size == len(tokenizer)
    assert features.pooled.shape == (3, 32) and features.tokens.shape == (3, length, 32)
    assert torch.equal(features.mask, text["attention_mask"].bool()) and not features.mask.all()
    assert_layer_normalised(features.pooled)
    with pytest.raises(UserError, match="pooling='max'"):
        tiny_bert(tokenizer, pooling="max")


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_text_pooling_ignores_padding(tokenizer, pooling):
    encoder = tiny_bert(tokenizer, pooling=pooling)
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    n = ids.shape[1]
    short = encoder({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    padded_ids = torch.cat([ids, torch.full((1, 4), tokenizer.pad_token_id)], dim=1)
    padded = encoder({"input_ids": padded_ids, "attention_mask": (torch.arange(n + 4) < n).long()[None]})
    torch.testing.assert_close(padded.pooled, short.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.tokens[:, :n], short.tokens, atol=1e-5, rtol=1e-5)
    first = padded.tokens[:, 0] if pooling == "cls" else padded.tokens[:, :n].mean(1)
    torch.testing.assert_close(padded.pooled, encoder.norm(first), atol=1e-5, rtol=1e-5)


@pytest.fixture
def saved_bert(tmp_path, tokenizer):
    torch.manual_seed(2)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64))
    folder = tmp_path / "tiny-bert"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model.state_dict()


def test_pretrained_loads_then_restores_without_files(saved_bert, tokenizer):
    folder, state = saved_bert
    encoder = pretrained(tokenizer, name=str(folder), freeze=True)
    assert encoder.dim == 32 and encoder.pooling == "cls"
    loaded = encoder.model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())
    assert not any(p.requires_grad for p in encoder.model.parameters())
    # Restoring from a checkpoint: the architecture comes from config_json(), the saved files are not read.
    shutil.rmtree(folder)
    restored = pretrained(tokenizer, name=str(folder), pretrained=False, saved_config=encoder.config_json())
    shapes = {key: value.shape for key, value in encoder.state_dict().items()}
    assert {key: value.shape for key, value in restored.state_dict().items()} == shapes
    restored.load_state_dict(encoder.state_dict())  # strict: the checkpoint's weights fit exactly


@pytest.mark.parametrize("name", ["no-such-org/no-such-bert", "{tmp}/no_such_dir"])
def test_pretrained_missing_name_fails_fast(tokenizer, tmp_path, name):
    name = name.format(tmp=tmp_path)
    start = time.monotonic()
    with pytest.raises(UserError) as error:
        pretrained(tokenizer, name=name)
    assert time.monotonic() - start < 10 and repr(name) in str(error.value)


def features(batch=3, seed=0, text_lengths=(5, 2, 3)) -> dict[str, Features]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.arange(6)[None] < torch.tensor(text_lengths)[:, None]
    return {
        "image": Features(torch.randn(batch, 16, generator=generator), torch.randn(batch, 4, 16, generator=generator),
                          torch.ones(batch, 4, dtype=torch.bool)),
        "text": Features(torch.randn(batch, 8, generator=generator), torch.randn(batch, 6, 8, generator=generator), mask),
    }


FUSIONS = {"early": EarlyFusion, "late": lambda dims: LateFusion(dims, dim=12),
           "middle": lambda dims: MiddleFusion(dims, dim=8, heads=2)}


@pytest.mark.parametrize("modalities", [("image", "text"), ("image",), ("text",)])
@pytest.mark.parametrize("kind", list(FUSIONS))
def test_fusion_output_shape_and_order(kind, modalities):
    dims = {m: DIMS[m] for m in modalities}
    torch.manual_seed(0)
    fusion = FUSIONS[kind](dims).eval()
    torch.manual_seed(0)
    reordered = FUSIONS[kind](dict(reversed(dims.items()))).eval()
    inputs = {m: f for m, f in features().items() if m in modalities}
    out = fusion(inputs)
    expected = {"early": sum(dims.values()), "late": 12, "middle": 8 * len(modalities)}[kind]
    assert fusion.dim == expected and out.shape == (3, expected)
    torch.testing.assert_close(fusion(dict(reversed(inputs.items()))), out)
    torch.testing.assert_close(reordered(inputs), out)
    if kind == "early":  # image before text, whatever the dict order
        torch.testing.assert_close(out, torch.cat([inputs[m].pooled for m in sorted(modalities)], dim=1))


def test_late_fusion_alpha():
    torch.manual_seed(0)
    fusion = LateFusion(DIMS, dim=12)
    assert "alpha_logits" in dict(fusion.named_parameters())
    with torch.no_grad():
        fusion.alpha_logits.copy_(torch.tensor([2.0, -1.0]))
    torch.testing.assert_close(fusion.alpha().sum(), torch.tensor(1.0))
    fusion(features()).pow(2).sum().backward()
    assert fusion.alpha_logits.grad is not None and fusion.alpha_logits.grad.abs().sum() > 0


@pytest.mark.parametrize("modalities", [("image", "text"), ("text",)])
def test_middle_fusion_ignores_padded_text_tokens(modalities):
    torch.manual_seed(0)
    fusion = MiddleFusion({m: DIMS[m] for m in modalities}, dim=8, heads=2).eval()
    inputs = {m: f for m, f in features().items() if m in modalities}
    text = inputs["text"]
    tokens = torch.where(text.mask[..., None], text.tokens, 100 * features(seed=1)["text"].tokens)
    assert not torch.equal(tokens, text.tokens)
    changed = {**inputs, "text": Features(text.pooled, tokens, text.mask)}
    torch.testing.assert_close(fusion(changed), fusion(inputs))


def test_middle_fusion_gradients_cross_modalities():
    torch.manual_seed(0)
    fusion = MiddleFusion(DIMS, dim=8, heads=2)
    fusion(features())[:, :8].sum().backward()  # the image stream only (modalities in sorted order)
    assert fusion.project["image"].weight.grad.abs().sum() > 0
    assert fusion.project["text"].weight.grad.abs().sum() > 0  # reached through the co-attention


@pytest.mark.parametrize("hidden, out_dim, dim", [([8, 4], 3, 3), ([8, 4], None, 4), ([], 2, 2), ([], None, 10)])
def test_mlp(hidden, out_dim, dim):
    block = mlp(10, hidden, out_dim, dropout=0.5)
    widths = [layer.out_features for layer in block if isinstance(layer, torch.nn.Linear)]
    assert widths == hidden + ([out_dim] if out_dim else []) and block.dim == dim
    x = torch.randn(4, 10)
    assert block.eval()(x).shape == (4, dim)
    if not hidden and out_dim is None:
        assert torch.equal(block(x), x)  # shared.hidden=[]: fused features go straight to the heads


@pytest.mark.parametrize("task_type, width", [("multiclass", 3), ("binary", 1)])
def test_masked_task_loss(task_type, width):
    torch.manual_seed(0)
    logits = torch.randn(4, width, requires_grad=True)
    targets = torch.tensor([1, 0, 2, 1]) if task_type == "multiclass" else torch.tensor([1, 0, 1, 1])
    mask = torch.tensor([True, False, True, False])
    loss = masked_task_loss(task_type, logits, targets, mask)
    if task_type == "binary":
        expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[mask, 0], targets[mask].float())
    else:
        expected = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(loss, expected)
    noisy = logits.detach().clone()
    noisy[~mask] = 50.0
    other_targets = torch.where(mask, targets, 1 - targets.clamp(max=1))
    torch.testing.assert_close(masked_task_loss(task_type, noisy, other_targets, mask), expected.detach())
    loss.backward()
    assert (logits.grad[~mask] == 0).all() and (logits.grad[mask] != 0).any()
    # No labelled sample: exactly 0, still part of the graph, no gradient.
    logits.grad = None
    none = masked_task_loss(task_type, logits, targets, torch.zeros(4, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad
    none.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes-cache")


@pytest.mark.parametrize("overrides", [["fusion=late"], ["fusion=middle"], ["fusion=early", "encoder/text=none"]])
def test_build_model_heads_and_forward(cache_dir, overrides):
    with initialize_config_module("mtmm.conf", version_base="1.3"):
        cfg = compose("train", overrides=[
            f"data.source.cache_dir={cache_dir}", "data.source.train=20", "data.source.val=4", "data.source.test=4",
            "tasks=img+txt+match", "encoder.image.channels=[8,16]", *overrides])
    data = build_data(cfg, splits=("train",))
    torch.manual_seed(0)
    model = build_model(cfg, data.tasks, data.tokenizer).eval()
    assert set(model.encoders) == ({"image"} if "encoder/text=none" in overrides else {"image", "text"})
    assert {task: head[-1].out_features for task, head in model.heads.items()} == {"img": 6, "txt": 3, "match": 1}
    batch = data.datasets["train"].batch([0, 1, 2, 3, 4])
    out = model(batch)
    assert {task: tuple(v.shape) for task, v in out.items()} == {"img": (5, 6), "txt": (5, 3), "match": (5, 1)}
    assert all(torch.isfinite(v).all() for v in out.values())
