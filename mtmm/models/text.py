"""Text encoders: any Hugging Face encoder (a small random-init BERT by default, or a pretrained one offline)."""

from torch import nn
from transformers import BertConfig, BertModel

from mtmm.errors import UserError
from mtmm.models.adapters import add_adapters
from mtmm.models.features import Features, masked_mean, set_frozen
from mtmm.models.hf import load_tower, rebuild_tower

POOLINGS = ("mean", "cls", "pooler")


class HFTextEncoder(nn.Module):
    """Wraps a transformers encoder: tokens = last hidden states, pooled = [CLS], masked mean or the model's own
    pooler output (CLIP: the end-of-text token; SigLIP: its head), layer-normalised."""

    def __init__(self, model: nn.Module, pooling: str = "mean", freeze: bool = False, lora=None, ia3=None,
                 saved_config: str | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise UserError(f"encoder.text.pooling={pooling!r}; use one of {list(POOLINGS)}")
        self.saved_config = saved_config or model.config.to_json_string()
        self.pooling = pooling
        self.dim = model.config.hidden_size
        self.norm = nn.LayerNorm(self.dim)
        set_frozen(model, freeze)
        self.model = add_adapters(model, "text", lora, ia3)
        self.frozen = not any(p.requires_grad for p in self.model.parameters())  # adapters train

    def forward(self, text: dict) -> Features:
        mask = text["attention_mask"].bool()
        output = self.model(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        tokens = output.last_hidden_state
        if self.pooling == "pooler":
            pooled = getattr(output, "pooler_output", None)
            if pooled is None:
                raise UserError("encoder.text.pooling=pooler: this text model has no pooler output; use cls or mean")
        else:
            pooled = tokens[:, 0] if self.pooling == "cls" else masked_mean(tokens, mask)
        return Features(pooled=self.norm(pooled), tokens=tokens, mask=mask)

    def config_json(self) -> str:
        """The architecture (the whole model's, for a tower), saved in checkpoints so evaluation rebuilds the model
        without the original files."""
        return self.saved_config


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
               trust_remote_code: bool = False, gradient_checkpointing: bool = False, lora=None, ia3=None,
               saved_config: str | None = None, pretrained: bool = True) -> HFTextEncoder:
    """A Hugging Face text model (or the text tower of a CLIP / SigLIP checkpoint), AutoModel.from_pretrained(name)
    from a local directory or the local HF cache; never downloads. Code shipped with the model (auto_map) runs only
    with trust_remote_code=true, which the user sets by name; never a prompt.

    When rebuilding from a checkpoint (pretrained=False) the architecture comes from `saved_config` and the
    weights from the checkpoint, so the original files are not needed (and no code of the model's runs).
    """
    if pretrained:
        model, config_json = load_tower(name, "text", trust_remote_code, gradient_checkpointing)
    else:
        model, config_json = rebuild_tower(saved_config, "text", gradient_checkpointing), saved_config
    return HFTextEncoder(model, pooling=pooling, freeze=freeze, lora=lora, ia3=ia3, saved_config=config_json)
