"""Loss-based adaptive task weighting: Uncertainty, DWA, RLW, FAMO and GradNorm.

Every method is a Weighting (mtmm/weighting/protocol.py): `total = weighting(losses, shared)` once per training step
(nothing changes in eval mode), `weights()` -> {task: current weight} for the log, `end_epoch()` after each training
epoch; only GradNorm reads `shared` (needs_shared_parameters).
The configured lambda_k (tasks.<k>.weight) multiply each method's own weights, total = sum_k lambda_k w_k L_k, so that
lambda keeps its meaning ("how much this task matters") on top of the adaptive balance; weights() reports lambda_k w_k.

Shared conventions:
- Tasks are kept in sorted name order, so the state and RLW's draws do not depend on the order of the config's tasks.
- A loss of exactly 0 is how masked_task_loss says that no sample of the batch had a label for the task. Such a task
  tells nothing about its progress that step, so it is left out of the adaptive updates (epoch means, FAMO's logits,
  GradNorm's balance) instead of reading as a perfect fit.
- Whatever a resumed run needs is a buffer, so state_dict() saves it. Weights that must not follow the main loss
  (FAMO, GradNorm) are buffers moved by a hand-written Adam step: the main optimizer never sees them, their Adam
  moments are saved with them, and .to(device) cannot cut them off from an optimizer object.
"""

import math

import torch
from torch import Tensor, nn

from mtmm.distributed import mean_across_processes
from mtmm.errors import UserError


def _check_option(method: str, name: str, value, accepted: str, ok) -> None:
    """Options are checked when the run starts, not when the first step trips over them."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise UserError(f"loss.{name}={value!r} for loss={method}; use {accepted}")


def _task_names(task_weights: dict[str, float]) -> list[str]:
    if not task_weights:
        raise ValueError("task_weights is empty: a loss weighting needs at least one task")
    return sorted(task_weights)


def _lambdas(module: nn.Module, tasks: list[str], task_weights: dict[str, float]) -> None:
    # Not persistent: lambda comes from the config of the run, not from a checkpoint.
    module.register_buffer("lam", torch.tensor([float(task_weights[t]) for t in tasks]), persistent=False)


def _stack(tasks: list[str], losses: dict[str, Tensor]) -> Tensor:
    """The losses as one [K] tensor in the module's task order."""
    if set(losses) != set(tasks):
        raise ValueError(f"expected one loss for each task {tasks}, got losses for {sorted(losses)}")
    return torch.stack([losses[t] for t in tasks])


def _named(tasks: list[str], values: Tensor) -> dict[str, float]:
    return dict(zip(tasks, values.detach().float().cpu().tolist()))


def _adam(param: Tensor, grad: Tensor, m: Tensor, v: Tensor, step: Tensor, lr: float, weight_decay: float,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """One torch.optim.Adam step, in place (weight decay is L2 added to the gradient, as in Adam, not AdamW)."""
    grad = grad + weight_decay * param
    step += 1
    m.lerp_(grad, 1 - betas[0])
    v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    denom = v.sqrt() / torch.sqrt(1 - betas[1] ** step) + eps
    param.sub_(lr / (1 - betas[0] ** step) * m / denom)


def _adam_buffers(module: nn.Module, k: int) -> None:
    module.register_buffer("adam_m", torch.zeros(k))
    module.register_buffer("adam_v", torch.zeros(k))
    module.register_buffer("adam_step", torch.zeros(()))


class Uncertainty(nn.Module):
    """Uncertainty weighting (Kendall, Gal & Cipolla 2018): total = sum_k lambda_k (exp(-s_k) L_k + s_k), s_k = log
    sigma_k^2 learned by the main optimizer; weights() = lambda_k exp(-s_k).

    The paper writes 1/(2 sigma^2) L + log sigma for regression and 1/sigma^2 L + log sigma for classification. We use
    one form for every task type, like LibMTL; LibMTL's is (exp(-s) L + s) / 2, ours is twice that: a constant factor
    (absorbed by the learning rate) that changes neither the optimum s_k = log L_k nor the relative weights, and
    without it a single task at s = 0 is exactly lambda L. lambda_k also scales the s_k term, so it scales how fast
    s_k moves but not where it goes.
    """

    combines_gradients = False
    needs_shared_parameters = False

    def __init__(self, task_weights: dict[str, float], init_log_variance: float = 0.0):
        super().__init__()
        self.tasks = _task_names(task_weights)
        _lambdas(self, self.tasks, task_weights)
        _check_option("uncertainty", "init_log_variance", init_log_variance, "a finite number", math.isfinite)
        self.log_var = nn.Parameter(torch.full((len(self.tasks),), float(init_log_variance)))

    def forward(self, losses: dict[str, Tensor], shared: list[Tensor] | None = None) -> Tensor:
        loss = _stack(self.tasks, losses)
        # Without a label the s_k term alone would push sigma_k to 0 for nothing.
        present = (loss.detach() > 0).to(loss.dtype)
        return (self.lam * (torch.exp(-self.log_var) * loss + self.log_var * present)).sum()

    def weights(self) -> dict[str, float]:
        return _named(self.tasks, self.lam * torch.exp(-self.log_var.detach()))

    def end_epoch(self) -> None:
        pass


class DWA(nn.Module):
    """Dynamic Weight Average (Liu, Johns & Davison 2019): w_k(t) = K softmax_k(r(t-1) / T), r_k(t-1) = L_k(t-1) /
    L_k(t-2) with L the epoch-mean training loss; w = 1 for the first two epochs. total = sum_k lambda_k w_k L_k.

    forward accumulates the epoch mean (training steps only), end_epoch rolls the history and computes the weights
    of the next epoch; weights() are the ones in use this epoch.
    """

    combines_gradients = False
    needs_shared_parameters = False

    def __init__(self, task_weights: dict[str, float], temperature: float = 2.0):
        super().__init__()
        self.tasks = _task_names(task_weights)
        _lambdas(self, self.tasks, task_weights)
        _check_option("dwa", "temperature", temperature, "a number > 0", lambda v: v > 0)
        self.temperature = float(temperature)
        k = len(self.tasks)
        self.register_buffer("history", torch.zeros(2, k))  # epoch-mean losses of the epochs t-1 (row 0) and t-2
        self.register_buffer("epoch_sum", torch.zeros(k))
        self.register_buffer("epoch_count", torch.zeros(k))  # per task: steps where it had a label
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("w", torch.ones(k))

    def forward(self, losses: dict[str, Tensor], shared: list[Tensor] | None = None) -> Tensor:
        loss = _stack(self.tasks, losses)
        if self.training:  # under torch.distributed the global batch's losses, so every process has the same weights
            value = mean_across_processes(loss.detach().float())
            present = value > 0
            self.epoch_sum += torch.where(present, value, 0.0)
            self.epoch_count += present
        return (self.lam * self.w * loss).sum()

    def weights(self) -> dict[str, float]:
        return _named(self.tasks, self.lam * self.w)

    def end_epoch(self) -> None:
        if not bool(self.epoch_count.any()):
            return  # no training step since the last call: there is no new epoch mean to roll in
        # A task without a single label this epoch keeps its last mean (ratio 1: no news, no change).
        mean = torch.where(self.epoch_count > 0, self.epoch_sum / self.epoch_count.clamp_min(1), self.history[0])
        self.history.copy_(torch.stack([mean, self.history[0]]))
        self.epochs_seen += 1
        if int(self.epochs_seen) >= 2:
            previous = self.history[1]
            ratio = torch.where(previous > 0, self.history[0] / previous.clamp_min(1e-12), 1.0)
            self.w.copy_(len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0))
        self.epoch_sum.zero_()
        self.epoch_count.zero_()


class RLW(nn.Module):
    """Random Loss Weighting (Lin et al. 2022), as LibMTL: each training step w = softmax(z), z ~ N(0, I_K), total =
    sum_k lambda_k w_k L_k.

    The weights sum to 1, not K: the total is on the scale of the mean loss, 1/K of StaticWeighting's sum (LibMTL's
    convention; a single task is exactly lambda L). z is drawn with torch.randn on the losses' device, from torch's
    global generator. In eval mode no draw is made (it would shift the training's random stream): the total uses the
    expected weights 1/K. weights() are the last drawn ones (1/K before the first step).
    """

    combines_gradients = False
    needs_shared_parameters = False

    def __init__(self, task_weights: dict[str, float]):
        super().__init__()
        self.tasks = _task_names(task_weights)
        _lambdas(self, self.tasks, task_weights)
        k = len(self.tasks)
        self.register_buffer("w", torch.full((k,), 1.0 / k))

    def forward(self, losses: dict[str, Tensor], shared: list[Tensor] | None = None) -> Tensor:
        loss = _stack(self.tasks, losses)
        if not self.training:
            return (self.lam * loss).sum() / len(self.tasks)
        w = torch.softmax(torch.randn(len(self.tasks), device=loss.device), dim=0)
        self.w.copy_(w)
        return (self.lam * w * loss).sum()

    def weights(self) -> dict[str, float]:
        return _named(self.tasks, self.lam * self.w)

    def end_epoch(self) -> None:
        pass


class FAMO(nn.Module):
    """FAMO (Liu et al. 2023), following the official famo.py (get_weighted_loss / update) with min_losses = 0.

    Logits xi, z = softmax(xi), D_k = L_k + eps, c = sum_k z_k / D_k. The official step loss is sum_k z_k log(D_k) / c
    (c detached), whose gradient is sum_k w_k grad L_k with w_k = z_k / (c D_k) (sum_k w_k = 1). We return
    sum_k lambda_k w_k L_k with w detached: the same gradient (for lambda = 1), and a value on the scale of the losses.
    After the parameter step, xi takes one Adam step (lr w_lr, L2 weight decay gamma) on the gradient J_softmax^T delta,
    delta_k = log D_k(before) - log D_k(after): tasks whose log-loss fell least gain weight.

    Approximation: the official update evaluates the losses of the same batch again after the step. We take no second
    forward pass; the "after" losses are the next step's losses, on the next batch, so xi is updated at the start of
    each training forward (and the first step only records its losses). The batch-to-batch noise is averaged out by
    Adam, and the cost stays one forward per step. Gradient clipping (the official max_norm=1) is the loop's
    trainer.grad_clip. weights() = lambda_k z_k, the weights of the log-losses that FAMO learns; the weight of the raw
    loss in a step's gradient is lambda_k w_k, which also depends on that step's losses.
    """

    combines_gradients = False
    needs_shared_parameters = False

    def __init__(self, task_weights: dict[str, float], w_lr: float = 0.025, gamma: float = 0.001, eps: float = 1e-8):
        super().__init__()
        self.tasks = _task_names(task_weights)
        _lambdas(self, self.tasks, task_weights)
        _check_option("famo", "w_lr", w_lr, "a number > 0", lambda v: v > 0)
        _check_option("famo", "gamma", gamma, "a number >= 0", lambda v: v >= 0)
        _check_option("famo", "eps", eps, "a number > 0", lambda v: v > 0)
        self.w_lr, self.gamma, self.eps = float(w_lr), float(gamma), float(eps)
        k = len(self.tasks)
        self.register_buffer("logits", torch.zeros(k))
        _adam_buffers(self, k)
        self.register_buffer("prev_losses", torch.zeros(k))  # the "before" losses of the pending logits update
        self.register_buffer("has_prev", torch.zeros((), dtype=torch.bool))

    def forward(self, losses: dict[str, Tensor], shared: list[Tensor] | None = None) -> Tensor:
        loss = _stack(self.tasks, losses)
        # Under torch.distributed: the losses and the gradients at W are the means over processes (the global
        # batch's, as DDP averages), so every process takes the same Adam step on the same numbers.
        value = mean_across_processes(loss.detach().float())
        present = value > 0
        if self.training:
            if bool(self.has_prev):
                self._update_logits(value, present)
            self.prev_losses.copy_(value)
            self.has_prev.fill_(True)
        z = torch.softmax(self.logits, dim=0)
        inverse = torch.where(present, z / (value + self.eps), 0.0)
        w = inverse / inverse.sum().clamp_min(1e-30)  # 1 / c; all zero when no task had a label
        return (self.lam * w * loss).sum()

    def _update_logits(self, after: Tensor, present: Tensor) -> None:
        before = self.prev_losses
        known = present & (before > 0)  # a task without labels at either end gives no decrease to learn from
        delta = torch.where(known, torch.log(before + self.eps) - torch.log(after + self.eps), 0.0)
        z = torch.softmax(self.logits, dim=0)
        grad = z * (delta - (z * delta).sum())  # J_softmax^T delta; the Jacobian diag(z) - z z^T is symmetric
        _adam(self.logits, grad, self.adam_m, self.adam_v, self.adam_step, self.w_lr, self.gamma)

    def weights(self) -> dict[str, float]:
        return _named(self.tasks, self.lam * torch.softmax(self.logits, dim=0))

    def end_epoch(self) -> None:
        pass


class GradNorm(nn.Module):
    """GradNorm (Chen et al. 2018): weights w_k (sum K) that equalise the tasks' gradient norms on the last shared
    layer W, scaled by their relative training rates.

    Each training step: G_k = ||grad_W (w_k L_k)||, r_k = (L_k / L_k(0)) / mean_j(L_j / L_j(0)), L_grad = sum_k
    |G_k - mean(G) r_k^alpha| with the target detached; w takes one Adam step (lr) on L_grad alone, then is floored at
    1e-4 (a negative weight would ascend its loss) and renormalised to sum K. As in the paper's algorithm, this step's
    total uses the weights from before the update, total = sum_k lambda_k w_k L_k (w detached); weights() = lambda_k
    w_k are the updated ones, used by the next step. L_k(0) is each task's first loss (its first labelled batch).
    Costs one extra backward per task down to W (retain_graph), which is why W is the last shared layer only.
    """

    combines_gradients = False
    needs_shared_parameters = True  # the last shared layer's parameters, whose gradient norms it balances
    averages_across_processes = True  # losses and gradient rows are averaged over processes (protocol.py)

    def __init__(self, task_weights: dict[str, float], alpha: float = 1.5, lr: float = 0.025):
        super().__init__()
        self.tasks = _task_names(task_weights)
        _lambdas(self, self.tasks, task_weights)
        _check_option("gradnorm", "alpha", alpha, "a number >= 0", lambda v: v >= 0)
        _check_option("gradnorm", "lr", lr, "a number > 0", lambda v: v > 0)
        self.alpha, self.lr = float(alpha), float(lr)
        k = len(self.tasks)
        self.register_buffer("w", torch.ones(k))
        _adam_buffers(self, k)
        self.register_buffer("initial_losses", torch.zeros(k))  # L_k(0); 0 = not seen yet

    def forward(self, losses: dict[str, Tensor], shared: list[Tensor] | None = None) -> Tensor:
        loss = _stack(self.tasks, losses)
        w = self.w.clone()  # this step's weights; self.w is updated in place below
        if self.training:
            if shared is None:
                raise ValueError("GradNorm needs the parameters of the last shared layer: call "
                                 "weighting(losses, shared=[...]) with the model's last shared layer's parameters, "
                                 "or pick another loss weighting (loss=static, uncertainty, dwa, rlw, famo)")
            self._update(loss, [p for p in shared if p.requires_grad])
        return (self.lam * w * loss).sum()

    def _update(self, loss: Tensor, shared: list[Tensor]) -> None:
        if not shared:
            raise ValueError("GradNorm got no shared parameter that requires grad; it balances their gradients")
        # Under torch.distributed: the losses and the gradients at W are the means over processes (the global
        # batch's, as DDP averages), so every process takes the same Adam step on the same numbers.
        value = mean_across_processes(loss.detach().float())
        present = value > 0
        self.initial_losses.copy_(torch.where((self.initial_losses == 0) & present, value, self.initial_losses))
        flags = present.tolist()
        count = sum(flags)
        if count == 0:
            return
        rows = torch.zeros(len(flags), sum(p.numel() for p in shared), device=value.device)  # grad_W L_k
        for k, here in enumerate(flags):
            if here and loss[k].requires_grad and loss[k].detach() != 0:
                grads = torch.autograd.grad(loss[k], shared, retain_graph=True, allow_unused=True)
                rows[k] = torch.cat([(g if g is not None else torch.zeros_like(p)).float().reshape(-1)
                                     for g, p in zip(grads, shared)])
        norms = mean_across_processes(rows).norm(dim=1)  # ||grad_W L_k||, so that G_k = w_k norms_k
        g = self.w * norms
        rate = torch.where(present, value / self.initial_losses.clamp_min(1e-12), 0.0)
        relative = rate / (rate.sum() / count)
        target = g.sum() / count * relative ** self.alpha
        # d L_grad / d w_k = sign(G_k - target_k) ||grad_W L_k||, as the target is a constant.
        grad = torch.where(present, torch.sign(g - target) * norms, 0.0)
        _adam(self.w, grad, self.adam_m, self.adam_v, self.adam_step, self.lr, 0.0)
        self.w.clamp_(min=1e-4)
        self.w.mul_(len(self.tasks) / self.w.sum())

    def weights(self) -> dict[str, float]:
        return _named(self.tasks, self.lam * self.w)

    def end_epoch(self) -> None:
        pass


METHODS = {"uncertainty": Uncertainty, "dwa": DWA, "rlw": RLW, "famo": FAMO, "gradnorm": GradNorm}
