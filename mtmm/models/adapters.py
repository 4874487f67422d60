"""Parameter-efficient fine-tuning of an encoder through the `peft` library: LoRA (`encoder.<m>.lora.rank=8`) or
IA3 (`encoder.<m>.ia3.enabled=true`). The encoder's own weights are frozen; only the adapters (and fusion, shared
layers and heads) train. The adapters are part of the model's state dict, so checkpoints hold what mtmm-eval needs,
and a rebuilt model gets the same adapters before its weights are loaded."""

from torch import nn

from mtmm.errors import UserError

# Attention projections LoRA adapts by default, by how architectures name them: the first set an encoder has wins.
ATTENTION_PROJECTIONS = (("q_proj", "v_proj"), ("query", "value"), ("qkv",), ("to_q", "to_v"), ("q_lin", "v_lin"))
# IA3 also scales the input of each block's second feed-forward layer
FEEDFORWARD_OUT = ("fc2", "output.dense", "mlp.fc2", "out_lin", "lin2")


def linear_names(module: nn.Module) -> list[str]:
    return [name for name, child in module.named_modules() if isinstance(child, (nn.Linear, nn.Conv1d)) and name]


def default_targets(module: nn.Module) -> list[str]:
    """The attention projections of the first naming scheme the encoder uses; else every linear layer."""
    names = linear_names(module)
    for scheme in ATTENTION_PROJECTIONS:
        if all(any(name.split(".")[-1] == part for name in names) for part in scheme):
            return list(scheme)
    return sorted({name.split(".")[-1] for name in names})


def add_adapters(module: nn.Module, modality: str, lora=None, ia3=None) -> nn.Module:
    """`module` with LoRA or IA3 adapters injected (in place) and only them trainable; unchanged when both are off."""
    lora = dict(lora or {})
    ia3 = dict(ia3 or {})
    use_lora, use_ia3 = lora.get("rank") is not None, bool(ia3.get("enabled"))
    if not (use_lora or use_ia3):
        return module
    if use_lora and use_ia3:
        raise UserError(f"encoder.{modality}: lora.rank and ia3.enabled are both set; choose one adapter")
    try:
        import peft
    except ImportError:
        raise UserError(f"encoder.{modality}.lora / ia3 need the peft package: pip install \"mtmm[backbones]\"") \
            from None
    names = linear_names(module)
    if use_lora:
        rank = lora["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise UserError(f"encoder.{modality}.lora.rank={rank!r}; use a whole number >= 1, or null for no LoRA")
        targets = list(lora.get("target_modules") or default_targets(module))
        check_targets(targets, names, f"encoder.{modality}.lora.target_modules")
        config = peft.LoraConfig(r=rank, lora_alpha=lora.get("alpha", 2 * rank), lora_dropout=lora.get("dropout", 0.0),
                                 target_modules=targets, bias="none")
        prefix = "lora_"
    else:
        targets = list(ia3.get("target_modules") or default_targets(module) + [
            part for part in FEEDFORWARD_OUT if any(name.endswith(part) for name in names)])
        feedforward = list(ia3.get("feedforward_modules") or [t for t in targets if t in FEEDFORWARD_OUT])
        check_targets(targets, names, f"encoder.{modality}.ia3.target_modules")
        config = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward)
        prefix = "ia3_"
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    module = peft.inject_adapter_in_model(config, module)
    trainable = 0
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(prefix in name)
        trainable += parameter.numel() if prefix in name else 0
    if trainable == 0:
        raise UserError(f"encoder.{modality}: no adapter was added (targets {targets})")
    return module


def check_targets(targets: list[str], names: list[str], key: str) -> None:
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if missing:
        suffixes = sorted({name.split(".")[-1] for name in names})
        raise UserError(f"{key}: {missing} name no linear layer of this encoder; its linear layers end in {suffixes}")
