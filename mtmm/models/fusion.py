"""Fusion: the modalities' Features -> one vector h [B, dim] for the shared layers.

Every fusion takes `input_dims` (modality -> pooled width), works with any non-empty subset of modalities,
and exposes its output width as `.dim`. Modalities are always visited in sorted order, so parameters and
concatenations do not depend on dict order.
"""

import math

import torch
from torch import nn

from mtmm.errors import UserError
from mtmm.models.features import Features, masked_mean


class EarlyFusion(nn.Module):
    """Concatenate the modalities' pooled features: h = [f_1(x_1); ...; f_M(x_M)]."""

    def __init__(self, input_dims: dict[str, int]):
        super().__init__()
        self.modalities = sorted(input_dims)
        self.dim = sum(input_dims.values())

    def forward(self, features: dict[str, Features]) -> torch.Tensor:
        return torch.cat([features[m].pooled for m in self.modalities], dim=-1)


class LateFusion(nn.Module):
    """The seed's h = sum_i alpha_i f_i(x_i): one branch f_i per modality, alpha = softmax of learnt logits."""

    def __init__(self, input_dims: dict[str, int], dim: int = 256):
        super().__init__()
        self.modalities = sorted(input_dims)
        self.branches = nn.ModuleDict(
            {m: nn.Sequential(nn.Linear(input_dims[m], dim), nn.GELU()) for m in self.modalities}
        )
        self.alpha_logits = nn.Parameter(torch.zeros(len(self.modalities)))
        self.dim = dim

    def alpha(self) -> torch.Tensor:
        """The normalised modality weights (they sum to 1)."""
        return torch.softmax(self.alpha_logits, dim=0)

    def forward(self, features: dict[str, Features]) -> torch.Tensor:
        alpha = self.alpha()
        return sum(alpha[i] * self.branches[m](features[m].pooled) for i, m in enumerate(self.modalities))


class MiddleFusion(nn.Module):
    """Token-level fusion: each modality's tokens (image feature-map cells, word pieces) attend to the other
    modality's tokens (co-attention), then each stream is mean-pooled and the results concatenated.
    With a single modality the stream attends to itself."""

    def __init__(self, input_dims: dict[str, int], dim: int = 128, heads: int = 4, layers: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        self.modalities = sorted(input_dims)
        # Every encoder's tokens have the width of its pooled features.
        self.project = nn.ModuleDict({m: nn.Linear(input_dims[m], dim) for m in self.modalities})
        # Tells the attention which modality a token came from.
        self.modality_embedding = nn.ParameterDict({m: nn.Parameter(torch.zeros(dim)) for m in self.modalities})
        self.layers = nn.ModuleList(
            [nn.ModuleDict({m: CrossAttentionBlock(dim, heads, dropout) for m in self.modalities}) for _ in range(layers)]
        )
        self.norm = nn.LayerNorm(dim)
        self.dim = dim * len(self.modalities)

    def forward(self, features: dict[str, Features]) -> torch.Tensor:
        streams = {m: self.project[m](features[m].tokens) + self.modality_embedding[m] for m in self.modalities}
        masks = {m: features[m].mask for m in self.modalities}
        for layer in self.layers:
            updated = {}
            for m in self.modalities:
                others = [o for o in self.modalities if o != m] or [m]
                context = torch.cat([streams[o] for o in others], dim=1)
                context_mask = torch.cat([masks[o] for o in others], dim=1)
                updated[m] = layer[m](streams[m], context, context_mask)
            streams = updated
        return torch.cat([masked_mean(self.norm(streams[m]), masks[m]) for m in self.modalities], dim=-1)


class CrossAttentionBlock(nn.Module):
    """Pre-norm transformer block whose attention reads from another sequence: x + attn(x, context) + ffn."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm_query, self.norm_context, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        context = self.norm_context(context)
        attended, _ = self.attention(self.norm_query(x), context, context, key_padding_mask=~context_mask,
                                     need_weights=False)
        x = x + attended
        return x + self.ffn(self.norm_ffn(x))


class GatedFusion(nn.Module):
    """Gated multimodal unit (GMU, Arevalo et al. 2017): h_m = tanh(W_m x_m) per modality, and per-channel gates
    z = softmax over modalities of W_z [x_1; ...; x_M], so h = sum_m z_m * h_m is a convex mix in every channel.
    With two modalities this is the paper's sigmoid form (z and 1 - z). With one modality the gate is 1 and no gate
    layer is built (it would get no gradient)."""

    def __init__(self, input_dims: dict[str, int], dim: int = 256):
        super().__init__()
        self.modalities = sorted(input_dims)
        self.branches = nn.ModuleDict({m: nn.Linear(input_dims[m], dim) for m in self.modalities})
        # The gate sees every modality at once: how much to trust one depends on what the others say.
        self.gate = nn.Linear(sum(input_dims.values()), len(self.modalities) * dim) if len(self.modalities) > 1 else None
        self.dim = dim
        self.last_gates: torch.Tensor | None = None  # [B, M, dim] of the last forward, for logging

    def forward(self, features: dict[str, Features]) -> torch.Tensor:
        pooled = [features[m].pooled for m in self.modalities]
        hidden = torch.stack([torch.tanh(self.branches[m](x)) for m, x in zip(self.modalities, pooled)], dim=1)
        if self.gate is None:
            gates = torch.ones_like(hidden)
        else:
            logits = self.gate(torch.cat(pooled, dim=-1)).view(hidden.shape[0], len(self.modalities), self.dim)
            gates = torch.softmax(logits, dim=1)
        self.last_gates = gates.detach()
        return (gates * hidden).sum(1)


class TensorFusion(nn.Module):
    """Tensor fusion (TFN, Zadeh et al. 2017): z_m = [x_m; 1] per modality, h = flatten(z_1 ⊗ ... ⊗ z_M).
    The appended 1 keeps every lower-order term: h holds the unimodal features themselves, their bimodal
    products and the constant 1 (the last element). Output size prod_m (d_m + 1), so each pooled vector is first
    projected (Linear, no activation) to `dim_per_modality` (None: use it as it is, which grows fast)."""

    def __init__(self, input_dims: dict[str, int], dim_per_modality: int | None = 16):
        super().__init__()
        self.modalities = sorted(input_dims)
        if dim_per_modality is None:
            self.project = nn.ModuleDict({m: nn.Identity() for m in self.modalities})
            widths = [input_dims[m] for m in self.modalities]
        else:
            self.project = nn.ModuleDict({m: nn.Linear(input_dims[m], dim_per_modality) for m in self.modalities})
            widths = [dim_per_modality] * len(self.modalities)
        self.dim = math.prod(width + 1 for width in widths)

    def forward(self, features: dict[str, Features]) -> torch.Tensor:
        fused = None
        for m in self.modalities:
            x = self.project[m](features[m].pooled)
            z = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=-1)
            # Outer product with what is fused so far, flattened row-major: [B, a] x [B, b] -> [B, a*b].
            fused = z if fused is None else (fused.unsqueeze(-1) * z.unsqueeze(1)).flatten(1)
        return fused


class LowRankFusion(nn.Module):
    """Low-rank multimodal fusion (LMF, Liu et al. 2018): TFN's weight tensor on the outer product, factored into
    `rank` modality-specific factors W_m [rank, d_m + 1, dim], so the outer product is never built:
    h = sum_r w_r * prod_m ([x_m; 1] W_m[r]) + bias. Cost is linear in the number of modalities."""

    def __init__(self, input_dims: dict[str, int], dim: int = 256, rank: int = 4):
        super().__init__()
        self.modalities = sorted(input_dims)
        # Each factor's output has about unit variance for unit-variance (layer-normalised) inputs, so the product
        # over modalities neither vanishes nor explodes at initialisation.
        self.factors = nn.ParameterDict({
            m: nn.Parameter(torch.randn(rank, input_dims[m] + 1, dim) / math.sqrt(input_dims[m] + 1))
            for m in self.modalities
        })
        self.rank_weights = nn.Parameter(torch.full((rank,), rank ** -0.5))  # w_r: sum of `rank` unit terms ~ unit
        self.bias = nn.Parameter(torch.zeros(dim))
        self.dim = dim

    def forward(self, features: dict[str, Features]) -> torch.Tensor:
        product = None
        for m in self.modalities:
            x = features[m].pooled
            z = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=-1)
            projected = torch.einsum("bi,rio->bro", z, self.factors[m])  # [B, rank, dim]
            product = projected if product is None else product * projected
        return torch.einsum("r,bro->bo", self.rank_weights, product) + self.bias


class FiLMFusion(nn.Module):
    """FiLM (Perez et al. 2018): the text's pooled features predict a per-channel scale and shift for every image
    token, gamma * W tokens + beta, followed by GELU; the image tokens are then mean-pooled (masked) and concatenated
    with the text's pooled features projected to `dim`: h = [image; text], width 2 * dim.
    Alone, the image goes through the same path unmodulated (gamma = 1, beta = 0) and the text through its Linear;
    either way h is dim wide per modality present."""

    def __init__(self, input_dims: dict[str, int], dim: int = 256):
        super().__init__()
        self.modalities = sorted(input_dims)
        unknown = set(self.modalities) - {"image", "text"}
        if unknown:
            raise UserError(f"FiLMFusion conditions image on text; it cannot take modalities {sorted(unknown)}")
        if "image" in input_dims:
            self.image_project = nn.Linear(input_dims["image"], dim)
        if "text" in input_dims:
            self.text_project = nn.Linear(input_dims["text"], dim)
        if len(self.modalities) == 2:
            # Predicts (delta gamma, beta) with gamma = 1 + delta gamma, as the paper does: starting near the
            # identity keeps the image features intact until the text has something to say.
            self.film = nn.Linear(input_dims["text"], 2 * dim)
        self.dim = dim * len(self.modalities)

    def forward(self, features: dict[str, Features]) -> torch.Tensor:
        parts = []
        if "image" in self.modalities:
            image = features["image"]
            tokens = self.image_project(image.tokens)
            if "text" in self.modalities:
                delta_gamma, beta = self.film(features["text"].pooled).unsqueeze(1).chunk(2, dim=-1)
                tokens = (1 + delta_gamma) * tokens + beta
            # The non-linearity is what makes modulating tokens differ from modulating their mean.
            parts.append(masked_mean(nn.functional.gelu(tokens), image.mask))
        if "text" in self.modalities:
            parts.append(self.text_project(features["text"].pooled))
        return torch.cat(parts, dim=-1)


class CrossAttentionFusion(nn.Module):
    """Two-stream co-attention transformer in the manner of ViLBERT (Lu et al. 2019). Each stream gets a learnt
    summary token ([CLS]-like) in front of its tokens; every layer, each stream self-attends, then cross-attends to
    the other stream (whose padding is masked out), then runs its feed-forward. h = the streams' final summary
    tokens, concatenated (dim per modality). With one modality the layers do self-attention only.

    Unlike MiddleFusion (cross-attention only, each stream reading the other, mean-pooled), here every stream also
    refines itself with self-attention each layer, and a learnt summary token decides what to keep."""

    def __init__(self, input_dims: dict[str, int], dim: int = 128, heads: int = 4, layers: int = 2,
                 dropout: float = 0.1):
        super().__init__()
        if dim % heads:
            raise UserError(f"fusion.dim={dim} must be a multiple of fusion.heads={heads}")
        self.modalities = sorted(input_dims)
        cross = len(self.modalities) > 1
        self.project = nn.ModuleDict({m: nn.Linear(input_dims[m], dim) for m in self.modalities})
        self.summary = nn.ParameterDict({m: nn.Parameter(0.02 * torch.randn(dim)) for m in self.modalities})
        self.layers = nn.ModuleList(
            [nn.ModuleDict({m: CoAttentionLayer(dim, heads, dropout, cross) for m in self.modalities})
             for _ in range(layers)]
        )
        self.norm = nn.LayerNorm(dim)
        self.dim = dim * len(self.modalities)

    def forward(self, features: dict[str, Features]) -> torch.Tensor:
        streams, masks = {}, {}
        for m in self.modalities:
            tokens = self.project[m](features[m].tokens)
            summary = self.summary[m].expand(tokens.shape[0], 1, -1)
            streams[m] = torch.cat([summary, tokens], dim=1)
            # The summary token is always real, so no query ever faces a fully masked set of keys.
            masks[m] = torch.cat([features[m].mask.new_ones(tokens.shape[0], 1), features[m].mask], dim=1)
        for layer in self.layers:
            updated = {}
            for m in self.modalities:
                other = next((o for o in self.modalities if o != m), None)
                context = (streams[other], masks[other]) if other is not None else None
                updated[m] = layer[m](streams[m], masks[m], context)
            streams = updated  # both streams read each other's state from before this layer
        return torch.cat([self.norm(streams[m][:, 0]) for m in self.modalities], dim=-1)


class CoAttentionLayer(nn.Module):
    """One stream's pre-norm layer: x + self_attn(x), then + cross_attn(x, other) (when `cross`), then + ffn."""

    def __init__(self, dim: int, heads: int, dropout: float, cross: bool):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_query = nn.LayerNorm(dim) if cross else None
        self.norm_context = nn.LayerNorm(dim) if cross else None
        self.cross_attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True) if cross else None
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                context: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        normed = self.norm_self(x)
        x = x + self.self_attention(normed, normed, normed, key_padding_mask=~mask, need_weights=False)[0]
        if self.cross_attention is not None and context is not None:
            other, other_mask = self.norm_context(context[0]), context[1]
            x = x + self.cross_attention(self.norm_query(x), other, other, key_padding_mask=~other_mask,
                                         need_weights=False)[0]
        return x + self.ffn(self.norm_ffn(x))
