"""The gated, tensor, low-rank, FiLM and cross-attention fusions, and the sharing modules (hard, MMoE, CGC)."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtmm.models.features import Features
from mtmm.models.fusion import CrossAttentionFusion, FiLMFusion, GatedFusion, LowRankFusion, TensorFusion
from mtmm.models.sharing import CGC, MMoE, HardSharing
from test_models import features  # the same random Features as the existing fusion tests

CONF = Path(__file__).resolve().parents[1] / "conf"
DIMS = {"image": 16, "text": 8}
TASKS = ["img", "txt", "match"]

FUSIONS = {
    "gated": lambda dims: GatedFusion(dims, dim=12),
    "tensor": lambda dims: TensorFusion(dims, dim_per_modality=4),
    "lowrank": lambda dims: LowRankFusion(dims, dim=12, rank=3),
    "film": lambda dims: FiLMFusion(dims, dim=12),
    "cross_attention": lambda dims: CrossAttentionFusion(dims, dim=8, heads=2, layers=2),
}
EXPECTED_DIM = {  # modalities -> fusion.dim
    "gated": lambda ms: 12,
    "tensor": lambda ms: 5 ** len(ms),
    "lowrank": lambda ms: 12,
    "film": lambda ms: 12 * len(ms),
    "cross_attention": lambda ms: 8 * len(ms),
}
SUBSETS = [("image", "text"), ("image",), ("text",)]


def subset(modalities) -> tuple[dict[str, int], dict[str, Features]]:
    return {m: DIMS[m] for m in modalities}, {m: f for m, f in features().items() if m in modalities}


def with_text(inputs: dict[str, Features], **changes) -> dict[str, Features]:
    text = inputs["text"]
    fields = {"pooled": text.pooled, "tokens": text.tokens, "mask": text.mask, **changes}
    return {**inputs, "text": Features(**fields)}


@pytest.mark.parametrize("modalities", SUBSETS)
@pytest.mark.parametrize("kind", list(FUSIONS))
def test_fusion_shape_order_and_determinism(kind, modalities):
    dims, inputs = subset(modalities)
    torch.manual_seed(0)
    fusion = FUSIONS[kind](dims).eval()
    out = fusion(inputs)
    assert fusion.dim == EXPECTED_DIM[kind](modalities) and out.shape == (3, fusion.dim)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(fusion(dict(reversed(inputs.items()))), out, rtol=0, atol=0)
    torch.testing.assert_close(fusion(inputs), out, rtol=0, atol=0)


@pytest.mark.parametrize("modalities", SUBSETS)
@pytest.mark.parametrize("kind", list(FUSIONS))
def test_fusion_gradients_reach_every_parameter(kind, modalities):
    # Single-modality fusions build no parameters they would not use (e.g. no gate, no FiLM generator).
    dims, inputs = subset(modalities)
    torch.manual_seed(0)
    fusion = FUSIONS[kind](dims).train()
    fusion(inputs).pow(2).sum().backward()
    starved = [name for name, p in fusion.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert starved == []


@pytest.mark.parametrize("modalities", [("image", "text"), ("text",)])
@pytest.mark.parametrize("kind", list(FUSIONS))
def test_fusion_ignores_padded_text_tokens(kind, modalities):
    dims, inputs = subset(modalities)
    torch.manual_seed(0)
    fusion = FUSIONS[kind](dims).eval()
    text = inputs["text"]
    tokens = torch.where(text.mask[..., None], text.tokens, 100 * features(seed=1)["text"].tokens)
    assert not torch.equal(tokens, text.tokens)
    torch.testing.assert_close(fusion(with_text(inputs, tokens=tokens)), fusion(inputs))


def test_cross_attention_reads_text_tokens_and_crosses_streams():
    # The padding test above would pass trivially if the tokens were ignored altogether.
    torch.manual_seed(0)
    fusion = CrossAttentionFusion(DIMS, dim=8, heads=2, layers=1).eval()
    inputs = features()
    text = inputs["text"]
    tokens = torch.where(text.mask[..., None], text.tokens + 1, text.tokens)
    changed = fusion(with_text(inputs, tokens=tokens))
    assert not torch.allclose(changed[:, :8], fusion(inputs)[:, :8])  # the image summary sees the text


def test_tensor_fusion_keeps_unimodal_terms_and_constant():
    torch.manual_seed(0)
    fusion = TensorFusion(DIMS, dim_per_modality=4).eval()
    inputs = features()
    out = fusion(inputs).view(3, 5, 5)  # [image + 1, text + 1], modalities in sorted order
    image = fusion.project["image"](inputs["image"].pooled)
    text = fusion.project["text"](inputs["text"].pooled)
    torch.testing.assert_close(out[:, 4, 4], torch.ones(3))
    torch.testing.assert_close(out[:, :4, 4], image)
    torch.testing.assert_close(out[:, 4, :4], text)
    torch.testing.assert_close(out[:, :4, :4], image[:, :, None] * text[:, None, :])
    raw = TensorFusion(DIMS, dim_per_modality=None)
    assert raw.dim == 17 * 9 and list(raw.parameters()) == []
    alone = TensorFusion({"text": 8}, dim_per_modality=None)(features())
    assert alone.shape == (3, 9)
    torch.testing.assert_close(alone, torch.cat([features()["text"].pooled, torch.ones(3, 1)], dim=1))


def test_low_rank_factors_are_trained():
    torch.manual_seed(0)
    fusion = LowRankFusion(DIMS, dim=12, rank=3)
    parameters = dict(fusion.named_parameters())
    assert parameters["factors.image"].shape == (3, 17, 12) and parameters["factors.text"].shape == (3, 9, 12)
    before = {name: p.detach().clone() for name, p in parameters.items()}
    optimizer = torch.optim.SGD(fusion.parameters(), lr=0.1)
    fusion(features()).pow(2).sum().backward()
    optimizer.step()
    assert all(not torch.equal(parameters[name], before[name]) for name in ("factors.image", "factors.text",
                                                                             "rank_weights", "bias"))


def test_gated_fusion_gates_are_a_convex_mix():
    torch.manual_seed(0)
    fusion = GatedFusion(DIMS, dim=12).eval()
    fusion(features())
    gates = fusion.last_gates
    assert gates.shape == (3, 2, 12) and (gates > 0).all()
    torch.testing.assert_close(gates.sum(1), torch.ones(3, 12))
    fusion = GatedFusion({"image": 16}, dim=12).eval()
    out = fusion({"image": features()["image"]})
    torch.testing.assert_close(out, torch.tanh(fusion.branches["image"](features()["image"].pooled)))


def test_film_text_modulates_the_image_branch():
    torch.manual_seed(0)
    fusion = FiLMFusion(DIMS, dim=12).eval()
    inputs = features()
    changed = with_text(inputs, pooled=features(seed=1)["text"].pooled)
    image_part = slice(0, 12)  # [image; text]
    assert not torch.allclose(fusion(changed)[:, image_part], fusion(inputs)[:, image_part])
    # Without text the image is not modulated: the same weights give the gamma = 1, beta = 0 result.
    alone = FiLMFusion({"image": 16}, dim=12).eval()
    alone.image_project.load_state_dict(fusion.image_project.state_dict())
    with torch.no_grad():
        fusion.film.weight.zero_()
        fusion.film.bias.zero_()
    torch.testing.assert_close(alone({"image": inputs["image"]}), fusion(inputs)[:, image_part])


SHARING = {
    "hard": lambda: HardSharing(10, TASKS, hidden=[8], dropout=0.0),
    "mmoe": lambda: MMoE(10, TASKS, num_experts=3, expert_hidden=[16, 8]),
    "cgc": lambda: CGC(10, TASKS, shared_experts=2, task_experts=2, expert_hidden=[8]),
}


@pytest.mark.parametrize("kind", list(SHARING))
def test_sharing_shapes_and_gates(kind):
    torch.manual_seed(0)
    sharing = SHARING[kind]().eval()
    out = sharing(torch.randn(5, 10))
    assert sorted(out) == sorted(TASKS) and sharing.dim == 8
    assert all(out[task].shape == (5, 8) for task in TASKS)
    if kind == "hard":
        assert sharing.last_gates == {} and all(out[task] is out["img"] for task in TASKS)
        return
    experts = {"mmoe": 3, "cgc": 4}[kind]
    for task in TASKS:
        assert sharing.last_gates[task].shape == (5, experts)
        torch.testing.assert_close(sharing.last_gates[task].sum(-1), torch.ones(5))
    assert not torch.allclose(out["img"], out["txt"]) and not torch.allclose(out["txt"], out["match"])


def test_cgc_task_experts_learn_from_their_own_task_only():
    torch.manual_seed(0)
    cgc = CGC(10, TASKS, shared_experts=1, task_experts=1, expert_hidden=[8])
    cgc(torch.randn(5, 10))["txt"].pow(2).sum().backward()

    def reached(module: torch.nn.Module) -> bool:
        return all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    def untouched(module: torch.nn.Module) -> bool:
        return all(p.grad is None for p in module.parameters())

    assert reached(cgc.task_experts["txt"]) and reached(cgc.shared_experts) and reached(cgc.gates["txt"])
    assert untouched(cgc.task_experts["img"]) and untouched(cgc.task_experts["match"])
    assert untouched(cgc.gates["img"]) and untouched(cgc.gates["match"])


@pytest.mark.parametrize("name", ["gated", "tensor", "lowrank", "film", "cross_attention"])
def test_fusion_configs_instantiate(name):
    cfg = OmegaConf.load(CONF / "fusion" / f"{name}.yaml")
    for modalities in SUBSETS:
        dims, inputs = subset(modalities)
        fusion = instantiate(cfg, input_dims=dims).eval()
        assert fusion(inputs).shape == (3, fusion.dim)


@pytest.mark.parametrize("name, kind", [("hard", HardSharing), ("mmoe", MMoE), ("cgc", CGC)])
def test_sharing_configs_instantiate(name, kind):
    cfg = OmegaConf.load(CONF / "mtl" / f"{name}.yaml")
    sharing = instantiate(cfg, in_dim=10, tasks=TASKS)
    assert type(sharing) is kind and sharing.tasks == TASKS
    out = sharing(torch.randn(4, 10))
    assert sorted(out) == sorted(TASKS) and all(o.shape == (4, sharing.dim) for o in out.values())
