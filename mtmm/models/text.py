"""Text encoders: any Hugging Face encoder (a small random-init BERT by default, or a pretrained one offline)."""

import json

from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, BertModel, PreTrainedModel

from mtmm.data.tokenizer import custom_code_message, missing_pretrained_message
from mtmm.errors import UserError
from mtmm.hub import offline
from mtmm.models.features import Features, masked_mean, set_frozen


class HFTextEncoder(nn.Module):
    """Wraps a transformers encoder: tokens = last hidden states, pooled = [CLS] or masked mean, layer-normalised."""

    def __init__(self, model: PreTrainedModel, pooling: str = "mean", freeze: bool = False):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise UserError(f"encoder.text.pooling={pooling!r}; use mean or cls")
        self.model = model
        self.pooling = pooling
        self.dim = model.config.hidden_size
        self.norm = nn.LayerNorm(self.dim)
        self.frozen = freeze
        set_frozen(self.model, freeze)

    def forward(self, text: dict) -> Features:
        mask = text["attention_mask"].bool()
        tokens = self.model(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).last_hidden_state
        pooled = tokens[:, 0] if self.pooling == "cls" else masked_mean(tokens, mask)
        return Features(pooled=self.norm(pooled), tokens=tokens, mask=mask)

    def config_json(self) -> str:
        """The architecture, saved in checkpoints so evaluation rebuilds the model without the original files."""
        return self.model.config.to_json_string()


def bert_tiny(tokenizer, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 2,
              intermediate_size: int = 256, dropout: float = 0.1, max_length: int = 48, pooling: str = "mean",
              freeze: bool = False,
              saved_config: str | None = None, pretrained: bool = True) -> HFTextEncoder:
    """A small BertModel, random init, sized to the tokenizer's vocabulary (its architecture is all in the config)."""
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=intermediate_size,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        max_position_embeddings=max(64, max_length), pad_token_id=tokenizer.pad_token_id,
    )
    return HFTextEncoder(BertModel(config, add_pooling_layer=False), pooling=pooling, freeze=freeze)


def pretrained(tokenizer, name: str, max_length: int = 64, pooling: str = "cls", freeze: bool = False,
               trust_remote_code: bool = False, saved_config: str | None = None,
               pretrained: bool = True) -> HFTextEncoder:
    """AutoModel.from_pretrained(name) from a local directory or the local HF cache; never downloads. Code shipped
    with the model (auto_map) runs only with trust_remote_code=true, which the user sets by name; never a prompt.

    When rebuilding from a checkpoint (pretrained=False) the architecture comes from `saved_config` and the
    weights from the checkpoint, so the original files are not needed (and no code of the model's runs).
    """
    if not pretrained:
        if saved_config is None:
            raise UserError("the checkpoint has no text_config entry, which a pretrained text encoder is rebuilt from")
        return HFTextEncoder(model_from_saved_config(saved_config), pooling=pooling, freeze=freeze)
    try:
        offline()
        model = AutoModel.from_pretrained(name, local_files_only=True, trust_remote_code=bool(trust_remote_code))
    except (OSError, ValueError) as error:
        if "custom code" in str(error) or "trust_remote_code" in str(error):
            raise UserError(custom_code_message(name)) from None
        raise UserError(missing_pretrained_message(name, "text model")) from error
    return HFTextEncoder(model, pooling=pooling, freeze=freeze)


def model_from_saved_config(saved_config: str) -> PreTrainedModel:
    """A randomly initialised transformers model of the architecture a checkpoint describes (JSON text). Only the
    model types transformers itself defines: a config that asks for code of its own is refused."""
    try:
        fields = json.loads(saved_config)
    except (TypeError, json.JSONDecodeError):
        raise UserError("the checkpoint's text_config is not JSON text") from None
    if not isinstance(fields, dict):
        raise UserError("the checkpoint's text_config is not a JSON object")
    if "auto_map" in fields or "trust_remote_code" in fields:
        raise UserError("the checkpoint's text_config asks for custom code (auto_map); mtmm never runs code from a "
                        "checkpoint")
    try:
        config = AutoConfig.for_model(**fields)
        return AutoModel.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"the checkpoint's text_config describes no model transformers knows "
                        f"({str(error).splitlines()[0][:200]})") from None
