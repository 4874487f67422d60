"""What the training loop asks of a loss-weighting method: the one interface every method (an nn.Module built from
conf/loss/*.yaml by its `_target_`) has, its flags declared, not guessed.

Each step the loop calls `total = weighting(losses, shared=...)` with the per-task masked losses ({task: scalar};
exactly 0 for a task with no label in the batch), then either `total.backward()` or, for a method with
`combines_gradients`, `weighting.backward(losses, model)`, which fills the parameters' .grad itself. After every
training epoch it calls `end_epoch()`; `weights()` is what metrics.jsonl logs. Optional: `combines_once_per_step`
(True: under trainer.grad_accum_steps the loop sums `collect(losses, model)` over the micro-batches and calls
`apply(partial, model, scale)` once, as combine.py does on the parameters); `averages_across_processes` (True: under
distributed training it averages the per-task gradients it takes over the processes itself, so that every process
computes the same weights; required under device.nproc_per_node>1 for a method with combines_gradients or
needs_shared_parameters). A user's own method plugs in through
`loss._target_` (from a checkpoint only with trusted_targets=...), with these members.
"""

from typing import Protocol

from omegaconf import DictConfig
from torch import Tensor, nn

from mtmm.distributed import Rank
from mtmm.errors import UserError


class Weighting(Protocol):
    combines_gradients: bool  # True: the loop calls backward(losses, model) instead of total.backward()
    needs_shared_parameters: bool  # True: forward gets shared=model.last_shared_parameters() (else None)

    def __call__(self, losses: dict[str, Tensor], shared: list[nn.Parameter] | None = None) -> Tensor:
        """The step's total loss (what is logged; backpropagated unless combines_gradients)."""

    def weights(self) -> dict[str, float]:
        """Each task's current weight (times its tasks.<k>.weight), for the log."""

    def end_epoch(self) -> None:
        """Called after each training epoch (per-epoch methods such as DWA update their weights here)."""


def check_weighting(cfg: DictConfig, weighting, rank: Rank) -> None:
    """At start-up: the built `loss` is a Weighting, and its flags fit the run's precision and processes."""
    missing = [name for name in ("combines_gradients", "needs_shared_parameters", "weights", "end_epoch")
               if not hasattr(weighting, name)]
    if missing or not isinstance(weighting, nn.Module):
        raise UserError(f"loss._target_={cfg.loss.get('_target_')!r} built {type(weighting).__name__}, which is not "
                        f"a loss weighting: it needs to be an nn.Module with {', '.join(missing) or 'forward'} "
                        f"(see mtmm/weighting/protocol.py)")
    if weighting.combines_gradients and cfg.device.precision == "fp16":
        raise UserError(f"loss={cfg.loss.get('method', cfg.loss._target_)} combines per-task gradients, which fp16's "
                        f"loss scaling would distort; use device.precision=bf16 or fp32")
    accumulate = cfg.trainer.get("grad_accum_steps", 1)
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise UserError(f"trainer.grad_accum_steps={accumulate!r}; use a whole number >= 1 (batches of "
                        f"data.batch_size per optimizer step; 1: no accumulation)")
    # Under DDP a method that takes per-task gradients must average them over the processes itself (the loop's
    # backward bypasses DDP's reducer for combines_gradients), or the processes' weights and parameters drift
    # apart. combine.py and GradNorm do, and match one process on the same global batch
    # (tests/test_ddp_weighting.py); a method of the user's own says so with averages_across_processes = True.
    takes_gradients = weighting.combines_gradients or weighting.needs_shared_parameters
    if takes_gradients and rank.world_size > 1 and not getattr(weighting, "averages_across_processes", False):
        raise UserError(f"loss._target_={cfg.loss.get('_target_')!r} takes per-task gradients but does not declare "
                        f"averages_across_processes = True, so under device.nproc_per_node={rank.world_size} every "
                        f"process would weight its own share of the batch differently; average them with "
                        f"torch.distributed (as mtmm/weighting/combine.py does) and set the flag, or use one "
                        f"process (device.nproc_per_node=1)")
