"""Gradient-combining methods in the training loop: per-task gradients on the shared part of the model -> one
update by a function of mtmm.weighting.gradient (PCGrad, CAGrad, MGDA, IMTL-G, Aligned-MTL, Nash-MTL, UPGrad,
GradDrop, GradVac, DB-MTL, FairGrad)."""

import inspect

import torch
import torch.distributed as dist
from torch import nn

from mtmm.errors import UserError
from mtmm.weighting.gradient import METHODS


class GradientCombination(nn.Module):
    """`on="parameters"`: the K x P gradient matrix is taken over every shared parameter (encoders, fusion, shared
    layers) — exact, K backward passes. `on="representation"`: over the fused representation h [B, D], cheaper
    (the combined gradient is then backpropagated once through fusion and encoders). Task-specific parameters
    (heads) get the gradient of sum_k lambda_k L_k, which for a head is just its own task's gradient; under DB-MTL
    that of sum_k log(lambda_k L_k + 1e-8), as LibMTL, which backpropagates each task's log-loss.

    A task with no labelled sample in the batch has no gradient to offer: it drops out of that step's combination
    (weight 0) and the others are combined as if it were absent, as in the loss-based methods. The state of a
    stateful method (GradVac's targets, DB-MTL's gradient averages) lives in buffers named `state_<name>`, so that
    state_dict() saves it and a resumed run continues exactly; an absent task's share of it is left as it was."""

    combines_gradients = True
    needs_shared_parameters = False  # it takes the gradients on the shared part itself, in backward()
    averages_across_processes = True  # apply() all_reduces the per-task gradients (protocol.py)

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
        if method == "graddrop":  # its draws: seeded by the run's seed (set before the weighting is built) and count
            self.register_buffer("seed", torch.tensor(torch.initial_seed() % 2 ** 62, dtype=torch.int64))
            self.register_buffer("draws", torch.zeros((), dtype=torch.int64))

    def forward(self, losses: dict[str, torch.Tensor], shared=None) -> torch.Tensor:
        """The plain weighted sum: what is logged as the step's loss."""
        return sum(self.task_weights[task] * loss for task, loss in losses.items())

    def weights(self) -> dict[str, float]:
        """The weights the method gave each task (times lambda_k) at the last step."""
        return {task: float(w) for task, w in zip(self.task_weights, self.last_weights.tolist())}

    def end_epoch(self) -> None:
        pass

    @property
    def combines_once_per_step(self) -> bool:
        """On the parameters, the per-task gradients of trainer.grad_accum_steps micro-batches add up (collect, then
        add_partials) and are combined once (apply); the representation's rows belong to one micro-batch each."""
        return self.on == "parameters"

    def backward(self, losses: dict[str, torch.Tensor], model: nn.Module,
                 labelled: dict[str, bool] | None = None, scale: float = 1.0) -> None:
        """Fill .grad of every trainable parameter of `model` (call after optimizer.zero_grad()): collect this
        batch's per-task gradients, then combine them (apply). `scale` multiplies what is added to .grad (1/N for a
        micro-batch of N combined one by one, loss.on=representation under trainer.grad_accum_steps=N).

        `labelled[task]` says whether the batch had a label for the task; without it, a loss of exactly 0 is taken to
        mean none (masked_task_loss's convention). A labelled task whose loss is exactly 0 has a zero gradient anyway.
        """
        self.apply(self.collect(losses, model, labelled), model, scale=scale)

    def _points(self, model: nn.Module) -> tuple[list, list, list]:
        """(where the per-task gradients are taken, the parameters those points backpropagate into, the rest)."""
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if self.on == "parameters":
            shared = [p for name, p in named if not name.startswith(("heads.", "shared."))] + \
                     [p for name, p in named if name.startswith("shared.")]
            return shared, [], [p for name, p in named if name.startswith("heads.")]
        below = [p for name, p in named if not name.startswith(("heads.", "shared."))]
        return [model.fused], below, [p for name, p in named if name.startswith(("heads.", "shared."))]

    def _head_tasks(self, model: nn.Module) -> list[int | None]:
        """For each task-specific parameter on the parameters' path (`heads.<task>...`), its task's index (None for
        a head whose task this weighting does not combine: no loss reaches it)."""
        tasks = list(self.task_weights)
        return [tasks.index(task) if (task := name.split(".")[1]) in tasks else None
                for name, p in model.named_parameters() if p.requires_grad and name.startswith("heads.")]

    def collect(self, losses: dict[str, torch.Tensor], model: nn.Module,
                labelled: dict[str, bool] | None = None) -> dict:
        """This process's per-task gradients of one batch, not yet combined: `rows` [K, P] on the gradient points (a
        zero row for a task absent from the batch), `rest` the gradient of sum_k lambda_k L_k on the task-specific
        parameters, `losses` the scaled losses, `present` which tasks had labels, `used` / `reached` which
        task-specific parameters / gradient points a loss reached (the others keep .grad None, as after a plain
        backward), `count` batches. Partials of several micro-batches add up (add_partials); apply() combines them
        once (loss.on=parameters)."""
        tasks = list(losses)
        scaled = [self.task_weights[task] * losses[task] for task in tasks]
        if labelled is None:
            present = [bool(v) for v in (torch.stack([l.detach() for l in scaled]) != 0).tolist()]
        else:
            present = [bool(labelled[task]) for task in tasks]
        points, _, rest = self._points(model)
        rows = torch.zeros(len(tasks), sum(p.numel() for p in points), device=points[0].device,
                           dtype=points[0].dtype)
        reached = torch.zeros(len(points))
        for i, here in enumerate(present):
            if here and scaled[i].requires_grad:
                grads = torch.autograd.grad(scaled[i], points, retain_graph=True, allow_unused=True)
                reached = torch.maximum(reached, torch.tensor([float(g is not None) for g in grads]))
                rows[i] = flat_grad(grads, points)
        total = sum(scaled)
        grads = [None] * len(rest)
        if rest and total.requires_grad:
            grads = torch.autograd.grad(total, rest, retain_graph=True, allow_unused=True)
        return {"rows": rows, "rest": [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, rest)],
                "used": torch.tensor([g is not None for g in grads], dtype=torch.float32),  # None stays None
                "reached": reached,  # which gradient points some task's loss reached (the others keep .grad None)
                "losses": torch.stack([l.detach().float() for l in scaled]),
                "present": torch.tensor(present, dtype=torch.float32), "count": 1}

    def apply(self, partial: dict, model: nn.Module, scale: float = 1.0) -> None:
        """Combine collected per-task gradients into .grad (added to what is there, times `scale`).

        Under torch.distributed every process holds the partial of its own share of the global batch. On the
        parameters one all_reduce of [rows, rest, losses, present, used, reached] makes them the mean over
        processes (DDP's average; of the flags only "some process had it" counts), so every process combines the
        same matrix and, the method being deterministic on the same input (GradDrop draws from a generator seeded
        by the step, not by the process), computes the same update. On the
        representation the rows of different processes belong to different samples: they are gathered (each
        divided by the number of processes: the global batch's mean loss), combined, and each process
        backpropagates its own samples' part; the parameters below the representation then get the sum over
        processes, the task-specific ones the mean."""
        points, below, rest = self._points(model)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        count = partial["count"]
        rows, rest_grads = partial["rows"], partial["rest"]
        losses, present = partial["losses"].to(rows.device), partial["present"].to(rows.device)
        used, reached = partial["used"].to(rows.device), partial["reached"].to(rows.device)
        if world > 1:
            per_sample = self.on == "representation"
            pieces = [*([] if per_sample else [rows]), *rest_grads, losses, present, used, reached]
            pack = torch.cat([piece.reshape(-1).to(rows.dtype) for piece in pieces])
            dist.all_reduce(pack)
            pieces = [pack[offset:offset + piece.numel()].view_as(piece) for piece, offset in
                      zip(pieces, _offsets(pieces))]
            if not per_sample:
                rows, pieces = pieces[0], pieces[1:]
            rest_grads, pieces = pieces[:len(rest_grads)], pieces[len(rest_grads):]
            losses, present, used, reached = [piece.float() for piece in pieces]
            if per_sample:
                rows, mine = gather_columns(rows)
        divide = count * world
        rows, losses = rows / divide, losses / divide
        rest_grads = [g / divide for g in rest_grads]
        if self.method == "db_mtl":  # the heads descend their log-loss too: grad L_k / (L_k + 1e-8), as the rows do
            rest_grads = [g if k is None else g / (losses[k] + 1e-8).to(g.dtype)
                          for g, k in zip(rest_grads, self._head_tasks(model))]
        active = [i for i, here in enumerate((present > 0).tolist()) if here]
        weights = torch.zeros(len(losses))
        if active:
            options = dict(self.options)
            if self.stateful:
                options["state"] = state = self._state_of(active)
            if self.method == "graddrop":
                options["generator"] = self._generator()
            update, picked = METHODS[self.method](rows[active], losses[active].to(rows.dtype), **options)
            if self.stateful:
                self._keep_state(active, state)
            weights[active] = picked.detach().float().cpu()
        else:  # nothing to learn from on the shared part this step
            update = torch.zeros(rows.shape[1], device=rows.device, dtype=rows.dtype)
        lam = torch.tensor([self.task_weights[t] for t in self.task_weights])
        self.last_weights.copy_((weights * lam).to(self.last_weights.device))
        for parameter, grad, here in zip(rest, rest_grads, (used > 0).tolist()):
            if here:  # a head no loss reached (on any process) keeps .grad None, so the optimizer skips it
                _add_grad(parameter, grad * scale)
        if self.on == "parameters":  # a point no loss reached (on any process) keeps .grad None, as in a backward
            for parameter, piece, here in zip(points, unflatten(update, points), (reached > 0).tolist()):
                if here:
                    _add_grad(parameter, piece * scale)
            return
        if world > 1:
            update = update[mine]
        before = [p.grad for p in below]
        for p in below:
            p.grad = None
        model.fused.backward((update * scale).view_as(model.fused))
        if world > 1 and below:  # each process backpropagated its own samples' part of one update: the sum is all
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in below]
            flags = torch.tensor([float(p.grad is not None) for p in below], dtype=grads[0].dtype,
                                 device=grads[0].device)
            flat = torch.cat([*(g.reshape(-1) for g in grads), flags])
            dist.all_reduce(flat)
            for p, g, offset, here in zip(below, grads, _offsets(grads), (flat[-len(below):] > 0).tolist()):
                # a parameter that no process's part reached keeps .grad None (the optimizer skips it, as DDP's)
                p.grad = flat[offset:offset + g.numel()].view_as(g).clone() if here else None
        for p, old in zip(below, before):
            if old is not None:
                p.grad = old if p.grad is None else p.grad + old

    def _generator(self) -> torch.Generator:
        """GradDrop's draws: a CPU generator seeded by the run's seed and the number of combinations so far, the
        same in every process and in one (a resumed run continues the count: it is a buffer)."""
        self.draws += 1
        return torch.Generator().manual_seed((int(self.seed) * 1_000_003 + int(self.draws)) % 2 ** 63)

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
        for name in ("seed", "draws"):  # a checkpoint from before GradDrop's own generator: keep the fresh values
            if name in self._buffers and prefix + name not in state_dict:
                state_dict[prefix + name] = self._buffers[name].clone()
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


def _offsets(tensors) -> list[int]:
    offsets, at = [], 0
    for t in tensors:
        offsets.append(at)
        at += t.numel()
    return offsets


def _add_grad(parameter: torch.Tensor, grad: torch.Tensor) -> None:
    grad = grad.to(parameter.dtype)
    parameter.grad = grad.clone() if parameter.grad is None else parameter.grad + grad


def add_partials(a: dict | None, b: dict) -> dict:
    """Two micro-batches' collected gradients -> one (their sum; apply() divides by the count)."""
    if a is None:
        return b
    return {"rows": a["rows"] + b["rows"], "rest": [x + y for x, y in zip(a["rest"], b["rest"])],
            "used": torch.maximum(a["used"], b["used"]), "reached": torch.maximum(a["reached"], b["reached"]),
            "losses": a["losses"] + b["losses"], "present": torch.maximum(a["present"], b["present"]),
            "count": a["count"] + b["count"]}


def gather_columns(rows: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """Every process's [K, n_r] columns side by side in rank order (n_r may differ), and this process's slice."""
    world, me = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.int64, device=rows.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([rows.shape[1]], dtype=torch.int64, device=rows.device))
    sizes = [int(s) for s in sizes]
    padded = torch.zeros(rows.shape[0], max(sizes), dtype=rows.dtype, device=rows.device)
    padded[:, :rows.shape[1]] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    start = sum(sizes[:me])
    return torch.cat([part[:, :n] for part, n in zip(parts, sizes)], dim=1), slice(start, start + sizes[me])
