"""Gradient-combining methods in the training loop: per-task gradients on the shared part of the model -> one
update by a function of mtmm.weighting.gradient (PCGrad, CAGrad, MGDA, IMTL-G, Aligned-MTL, Nash-MTL, UPGrad,
GradDrop, GradVac, DB-MTL, FairGrad)."""

import inspect

import torch
from torch import nn

from mtmm.errors import UserError
from mtmm.weighting.gradient import METHODS


class GradientCombination(nn.Module):
    """`on="parameters"`: the K x P gradient matrix is taken over every shared parameter (encoders, fusion, shared
    layers) — exact, K backward passes. `on="representation"`: over the fused representation h [B, D], cheaper
    (the combined gradient is then backpropagated once through fusion and encoders). Task-specific parameters
    (heads) get the gradient of sum_k lambda_k L_k, which for a head is just its own task's gradient.

    A task with no labelled sample in the batch has no gradient to offer: it drops out of that step's combination
    (weight 0) and the others are combined as if it were absent, as in the loss-based methods. The state of a
    stateful method (GradVac's targets, DB-MTL's gradient averages) lives in buffers named `state_<name>`, so that
    state_dict() saves it and a resumed run continues exactly; an absent task's share of it is left as it was."""

    combines_gradients = True
    needs_shared_parameters = False  # it takes the gradients on the shared part itself, in backward()

    def __init__(self, task_weights: dict[str, float], method: str, on: str = "parameters",
                 options: dict | None = None):
        super().__init__()
        if method not in METHODS:
            raise UserError(f"loss.method={method!r} is not known; use one of {sorted(METHODS)}")
        if on not in ("parameters", "representation"):
            raise UserError(f"loss.on={on!r}; use parameters or representation")
        if method == "db_mtl" and on == "representation":
            raise UserError("loss.method=db_mtl averages gradients over steps, which only means something for "
                            "parameters (the fused representation belongs to different samples each step); "
                            "use loss.on=parameters")
        self.task_weights, self.method, self.on = dict(task_weights), method, on
        self.options = dict(options or {})
        # An option the method does not take is refused now, not at the first step.
        accepted = [name for name, parameter in inspect.signature(METHODS[method]).parameters.items()
                    if parameter.kind == inspect.Parameter.KEYWORD_ONLY and name not in ("state", "generator")]
        unknown = sorted(set(self.options) - set(accepted))
        if unknown:
            raise UserError(f"loss.options.{unknown[0]} is not an option of loss={method}; it takes {accepted}")
        self.stateful = "state" in inspect.signature(METHODS[method]).parameters
        self.register_buffer("last_weights", torch.ones(len(task_weights)))

    def forward(self, losses: dict[str, torch.Tensor], shared=None) -> torch.Tensor:
        """The plain weighted sum: what is logged as the step's loss."""
        return sum(self.task_weights[task] * loss for task, loss in losses.items())

    def weights(self) -> dict[str, float]:
        """The weights the method gave each task (times lambda_k) at the last step."""
        return {task: float(w) for task, w in zip(self.task_weights, self.last_weights.tolist())}

    def end_epoch(self) -> None:
        pass

    def backward(self, losses: dict[str, torch.Tensor], model: nn.Module,
                 labelled: dict[str, bool] | None = None) -> None:
        """Fill .grad of every trainable parameter of `model` (call after optimizer.zero_grad()).

        `labelled[task]` says whether the batch had a label for the task; without it, a loss of exactly 0 is taken to
        mean none (masked_task_loss's convention). A labelled task whose loss is exactly 0 has a zero gradient anyway.
        """
        tasks = list(losses)
        scaled = [self.task_weights[task] * losses[task] for task in tasks]
        if labelled is None:
            present = (torch.stack([l.detach() for l in scaled]) != 0).tolist()
        else:
            present = [bool(labelled[task]) for task in tasks]
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if self.on == "parameters":
            shared = [p for name, p in named if not name.startswith(("heads.", "shared."))] + \
                     [p for name, p in named if name.startswith("shared.")]
            rest = [p for name, p in named if name.startswith("heads.")]
            points = shared
        else:
            points = [model.fused]
            rest = [p for name, p in named if name.startswith(("heads.", "shared."))]
        active = [i for i, here in enumerate(present) if here]
        weights = torch.zeros(len(tasks))
        if active:
            rows = [flat_grad(torch.autograd.grad(scaled[i], points, retain_graph=True, allow_unused=True), points)
                    for i in active]
            grads = torch.stack(rows)
            options = dict(self.options)
            if self.stateful:
                options["state"] = state = self._state_of(active)
            update, picked = METHODS[self.method](grads, torch.stack([scaled[i].detach() for i in active]), **options)
            if self.stateful:
                self._keep_state(active, state)
            weights[active] = picked.detach().float().cpu()
        else:  # nothing to learn from on the shared part this step
            update = torch.zeros(sum(p.numel() for p in points), device=points[0].device, dtype=points[0].dtype)
        lam = torch.tensor([self.task_weights[t] for t in tasks])
        self.last_weights.copy_((weights * lam).to(self.last_weights.device))
        total = sum(scaled)
        if rest:
            for parameter, grad in zip(rest, torch.autograd.grad(total, rest, retain_graph=True, allow_unused=True)):
                parameter.grad = grad
        if self.on == "parameters":
            for parameter, piece in zip(points, unflatten(update, points)):
                parameter.grad = piece
        else:
            model.fused.backward(update.view_as(model.fused))

    def _state_of(self, active: list[int]) -> dict[str, torch.Tensor]:
        """The method's state for the tasks present this step (gradient.py's naming: pair_*, task_*, the rest)."""
        state = {}
        for name, value in self.named_buffers(recurse=False):
            if not name.startswith("state_"):
                continue
            key = name.removeprefix("state_")
            index = torch.tensor(active, device=value.device)
            if key.startswith("pair_"):
                value = value[index][:, index]
            elif key.startswith("task_"):
                value = value[index]
            state[key] = value.clone()
        return state

    def _keep_state(self, active: list[int], state: dict[str, torch.Tensor]) -> None:
        """Write the method's new state back into the buffers; the first step creates them at their full size."""
        k = len(self.task_weights)
        for key, value in state.items():
            name = f"state_{key}"
            value = value.detach()
            if name not in self._buffers:
                shape = (k, k) if key.startswith("pair_") else (k, *value.shape[1:]) if key.startswith("task_") else \
                    value.shape
                self.register_buffer(name, torch.zeros(shape, dtype=value.dtype, device=value.device))
            buffer = self._buffers[name]
            index = torch.tensor(active, device=buffer.device)
            value = value.to(buffer.device, buffer.dtype)
            if key.startswith("pair_"):
                buffer[index[:, None], index[None, :]] = value
            elif key.startswith("task_"):
                buffer[index] = value
            else:
                buffer.copy_(value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The method's state is created at the first step, sized by the shared parameters: a fresh module takes the
        # saved buffers' shapes, so that a checkpoint written after step 1 loads into it.
        for key, value in state_dict.items():
            if key.startswith(prefix + "state_") and "." not in key[len(prefix):]:
                name = key[len(prefix):]
                if name not in self._buffers or self._buffers[name].shape != value.shape:
                    self.register_buffer(name, torch.zeros(value.shape, dtype=value.dtype,
                                                           device=self.last_weights.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def flat_grad(grads, points) -> torch.Tensor:
    """One flat vector; a point the loss does not reach contributes zeros."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, points)])


def unflatten(vector: torch.Tensor, points) -> list[torch.Tensor]:
    pieces, start = [], 0
    for point in points:
        pieces.append(vector[start:start + point.numel()].view_as(point).to(point.dtype))
        start += point.numel()
    return pieces
