"""Gradient-combining methods in the training loop: per-task gradients on the shared part of the model -> one
update by a pure function of mtmm.weighting.gradient (PCGrad, CAGrad, MGDA, IMTL-G, Aligned-MTL, Nash-MTL)."""

import torch
from torch import nn

from mtmm.errors import UserError
from mtmm.weighting.gradient import METHODS


class GradientCombination(nn.Module):
    """`on="parameters"`: the K x P gradient matrix is taken over every shared parameter (encoders, fusion, shared
    layers) — exact, K backward passes. `on="representation"`: over the fused representation h [B, D], cheaper
    (the combined gradient is then backpropagated once through fusion and encoders). Task-specific parameters
    (heads) get the gradient of sum_k lambda_k L_k, which for a head is just its own task's gradient."""

    combines_gradients = True
    needs_shared_parameters = False  # it takes the gradients on the shared part itself, in backward()

    def __init__(self, task_weights: dict[str, float], method: str, on: str = "parameters", options: dict | None = None):
        super().__init__()
        if method not in METHODS:
            raise UserError(f"loss.method={method!r} is not known; use one of {sorted(METHODS)}")
        if on not in ("parameters", "representation"):
            raise UserError(f"loss.on={on!r}; use parameters or representation")
        self.task_weights, self.method, self.on = dict(task_weights), method, on
        self.options = dict(options or {})
        self.register_buffer("last_weights", torch.ones(len(task_weights)))

    def forward(self, losses: dict[str, torch.Tensor], shared=None) -> torch.Tensor:
        """The plain weighted sum: what is logged as the step's loss."""
        return sum(self.task_weights[task] * loss for task, loss in losses.items())

    def weights(self) -> dict[str, float]:
        """The weights the method gave each task (times lambda_k) at the last step."""
        return {task: float(w) for task, w in zip(self.task_weights, self.last_weights.tolist())}

    def end_epoch(self) -> None:
        pass

    def backward(self, losses: dict[str, torch.Tensor], model: nn.Module) -> None:
        """Fill .grad of every trainable parameter of `model` (call after optimizer.zero_grad())."""
        tasks = list(losses)
        scaled = [self.task_weights[task] * losses[task] for task in tasks]
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if self.on == "parameters":
            shared = [p for name, p in named if not name.startswith(("heads.", "shared."))] + \
                     [p for name, p in named if name.startswith("shared.")]
            rest = [p for name, p in named if name.startswith("heads.")]
            points = shared
        else:
            points = [model.fused]
            rest = [p for name, p in named if name.startswith(("heads.", "shared."))]
        rows = [flat_grad(torch.autograd.grad(loss, points, retain_graph=True, allow_unused=True), points)
                for loss in scaled]
        grads = torch.stack(rows)
        update, weights = METHODS[self.method](grads, torch.stack([l.detach() for l in scaled]), **self.options)
        self.last_weights.copy_(weights.detach() * torch.tensor([self.task_weights[t] for t in tasks],
                                                                device=weights.device))
        total = sum(scaled)
        if rest:
            for parameter, grad in zip(rest, torch.autograd.grad(total, rest, retain_graph=True, allow_unused=True)):
                parameter.grad = grad
        if self.on == "parameters":
            for parameter, piece in zip(points, unflatten(update, points)):
                parameter.grad = piece
        else:
            model.fused.backward(update.view_as(model.fused))


def flat_grad(grads, points) -> torch.Tensor:
    """One flat vector; a point the loss does not reach contributes zeros."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, points)])


def unflatten(vector: torch.Tensor, points) -> list[torch.Tensor]:
    pieces, start = [], 0
    for point in points:
        pieces.append(vector[start:start + point.numel()].view_as(point).to(point.dtype))
        start += point.numel()
    return pieces
