"""The seed's shared layers f_s and task-specific layers f_k are both small MLPs."""

from torch import nn


def mlp(in_dim: int, hidden: list[int], out_dim: int | None = None, dropout: float = 0.0) -> nn.Sequential:
    """Linear-GELU-Dropout per hidden size, then an optional output Linear (no activation)."""
    layers, width = [], in_dim
    for size in hidden:
        layers += [nn.Linear(width, size), nn.GELU(), nn.Dropout(dropout)]
        width = size
    if out_dim is not None:
        layers.append(nn.Linear(width, out_dim))
    block = nn.Sequential(*layers)
    block.dim = out_dim if out_dim is not None else width
    return block
