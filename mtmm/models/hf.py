"""Hugging Face models as encoders: loaded offline from a local directory or the local cache, and rebuilt from the
architecture a checkpoint saved (never from the original files, never running a model's own code).

A dual-tower checkpoint (CLIP, SigLIP and their kin: a model with `vision_model` and `text_model`) gives the tower
of the modality asked for; any other model is its own tower. The checkpoint keeps the whole model's config, so the
same tower is taken again when it is rebuilt.
"""

import json

from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from mtmm.data.tokenizer import custom_code_message, missing_pretrained_message
from mtmm.errors import UserError
from mtmm.hub import offline

TOWERS = {"image": "vision_model", "text": "text_model"}


def load_tower(name: str, modality: str, trust_remote_code: bool = False,
               gradient_checkpointing: bool = False) -> tuple[nn.Module, str]:
    """(the tower for `modality`, the whole model's config as JSON) of AutoModel.from_pretrained(name), local files
    only. Code shipped with the model (auto_map) runs only with trust_remote_code=true, which the user sets by name."""
    try:
        offline()
        model = AutoModel.from_pretrained(name, local_files_only=True, trust_remote_code=bool(trust_remote_code))
    except (OSError, ValueError) as error:
        if "custom code" in str(error) or "trust_remote_code" in str(error):
            raise UserError(custom_code_message(name, modality)) from None
        what = "vision model" if modality == "image" else "text model"
        raise UserError(missing_pretrained_message(name, what, modality)) from error
    return tower(model, modality, name, gradient_checkpointing), model.config.to_json_string()


def rebuild_tower(saved_config: str | None, modality: str, gradient_checkpointing: bool = False) -> nn.Module:
    """The tower of a randomly initialised model of the architecture a checkpoint describes (its weights follow)."""
    entry = f"{modality}_config"
    if saved_config is None:
        raise UserError(f"the checkpoint has no {entry} entry, which a pretrained {modality} encoder is rebuilt from")
    return tower(model_from_saved_config(saved_config, entry), modality, f"the checkpoint's {entry}",
                 gradient_checkpointing)


def tower(model: PreTrainedModel, modality: str, source: str, gradient_checkpointing: bool) -> nn.Module:
    if gradient_checkpointing:  # recompute each layer's activations in the backward pass: memory for time
        if not model.supports_gradient_checkpointing:
            raise UserError(f"encoder.{modality}.gradient_checkpointing=true: {source} ({type(model).__name__}) "
                            f"does not support it; set it to false")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    attribute, other = TOWERS[modality], TOWERS["text" if modality == "image" else "image"]
    if hasattr(model, attribute) and hasattr(model, other):
        return getattr(model, attribute)
    if hasattr(model, other):
        raise UserError(f"{source} ({type(model).__name__}) has a {other} but no {attribute}: it cannot encode "
                        f"the {modality} modality")
    return model


def model_from_saved_config(saved_config: str, entry: str = "text_config") -> PreTrainedModel:
    """A randomly initialised transformers model of the architecture a checkpoint describes (JSON text). Only the
    model types transformers itself defines: a config that asks for code of its own is refused."""
    try:
        fields = json.loads(saved_config)
    except (TypeError, json.JSONDecodeError):
        raise UserError(f"the checkpoint's {entry} is not JSON text") from None
    if not isinstance(fields, dict):
        raise UserError(f"the checkpoint's {entry} is not a JSON object")
    if "auto_map" in fields or "trust_remote_code" in fields:
        raise UserError(f"the checkpoint's {entry} asks for custom code (auto_map); mtmm never runs code from a "
                        f"checkpoint")
    try:
        config = AutoConfig.for_model(**fields)
        return AutoModel.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"the checkpoint's {entry} describes no model transformers knows "
                        f"({str(error).splitlines()[0][:200]})") from None
