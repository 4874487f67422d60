"""Sharing: the fused representation h [B, in_dim] -> one representation per task, each [B, dim], for the heads.

Every module takes `in_dim` and the task names, returns {task: tensor} from forward, exposes its output width as
`.dim`, and keeps the gate weights of its last forward in `.last_gates` ({task: [B, experts]}, detached, for
logging; empty where nothing is gated).
"""

from collections.abc import Sequence

import torch
from torch import nn

from mtmm.errors import UserError
from mtmm.models.mlp import mlp


class HardSharing(nn.Module):
    """One MLP shared by every task (the seed's shared layers): all tasks get the same tensor."""

    def __init__(self, in_dim: int, tasks: list[str], hidden: list[int], dropout: float = 0.0):
        super().__init__()
        self.tasks = list(tasks)
        self.trunk = mlp(in_dim, list(hidden), dropout=dropout)
        self.dim = self.trunk.dim
        self.last_gates: dict[str, torch.Tensor] = {}

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = self.trunk(h)
        return {task: shared for task in self.tasks}


class MMoE(nn.Module):
    """Multi-gate mixture of experts (Ma et al. 2018): `num_experts` MLP experts see h; each task mixes their
    outputs with its own softmax gate computed from h, so tasks that disagree can lean on different experts."""

    def __init__(self, in_dim: int, tasks: list[str], num_experts: int = 4, expert_hidden: Sequence[int] = (256,),
                 dropout: float = 0.0):
        super().__init__()
        self.tasks = list(tasks)
        if num_experts < 1:
            raise UserError(f"mtl.num_experts={num_experts}: MMoE needs at least one expert")
        self.experts = experts(in_dim, num_experts, expert_hidden, dropout)
        self.gates = nn.ModuleDict({task: nn.Linear(in_dim, num_experts) for task in self.tasks})
        self.dim = list(expert_hidden)[-1]
        self.last_gates: dict[str, torch.Tensor] = {}

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = torch.stack([expert(h) for expert in self.experts], dim=1)  # [B, E, dim]
        mixed = {}
        for task in self.tasks:
            weights = torch.softmax(self.gates[task](h), dim=-1)  # [B, E]
            self.last_gates[task] = weights.detach()
            mixed[task] = torch.einsum("be,bed->bd", weights, outputs)
        return mixed


class CGC(nn.Module):
    """Customized gate control, one level of PLE (Tang et al. 2020): experts shared by all tasks plus experts that
    belong to one task. Each task's softmax gate mixes its own experts and the shared ones (in that order in
    `last_gates`), never another task's, so a task's private experts learn from that task's loss alone."""

    def __init__(self, in_dim: int, tasks: list[str], shared_experts: int = 2, task_experts: int = 1,
                 expert_hidden: Sequence[int] = (256,), dropout: float = 0.0):
        super().__init__()
        self.tasks = list(tasks)
        if task_experts < 0 or shared_experts < 0 or shared_experts + task_experts < 1:
            raise UserError(f"mtl.shared_experts={shared_experts}, mtl.task_experts={task_experts}: "
                            "neither may be negative and together they need at least one expert")
        self.shared_experts = experts(in_dim, shared_experts, expert_hidden, dropout)
        self.task_experts = nn.ModuleDict(
            {task: experts(in_dim, task_experts, expert_hidden, dropout) for task in self.tasks}
        )
        self.gates = nn.ModuleDict({task: nn.Linear(in_dim, task_experts + shared_experts) for task in self.tasks})
        self.dim = list(expert_hidden)[-1]
        self.last_gates: dict[str, torch.Tensor] = {}

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = [expert(h) for expert in self.shared_experts]
        mixed = {}
        for task in self.tasks:
            outputs = torch.stack([expert(h) for expert in self.task_experts[task]] + shared, dim=1)  # [B, E, dim]
            weights = torch.softmax(self.gates[task](h), dim=-1)
            self.last_gates[task] = weights.detach()
            mixed[task] = torch.einsum("be,bed->bd", weights, outputs)
        return mixed


def experts(in_dim: int, count: int, hidden: Sequence[int], dropout: float) -> nn.ModuleList:
    """`count` MLP experts of the same shape; without a hidden layer they would all be the identity."""
    hidden = list(hidden)
    if not hidden:
        raise UserError("mtl.expert_hidden is empty; give the experts at least one hidden size, e.g. [256]")
    return nn.ModuleList([mlp(in_dim, hidden, dropout=dropout) for _ in range(count)])
