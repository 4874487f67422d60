"""An exponential moving average of the weights (`trainer.ema=0.999`), through torch.optim.swa_utils.AveragedModel:
updated after every optimizer step, it is what validation scores, what best.pt and last.pt hold as their `model`
(so mtmm-eval, mtmm-predict and mtmm-export use it with no option), while the trained weights travel beside it
(`trained_model`) for resuming."""

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mtmm.errors import UserError


def build_ema(model: torch.nn.Module, decay) -> AveragedModel | None:
    """The averaged copy of `model` (buffers too: BatchNorm statistics are averaged as the weights are); None when
    trainer.ema is null."""
    if decay is None:
        return None
    check_decay(decay)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(decay)), use_buffers=True)
    return ema.eval()


def check_decay(decay) -> None:
    if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1):
        raise UserError(f"trainer.ema={decay!r}; use a decay in [0, 1) such as 0.999 (the share of the average kept "
                        f"each step), or null for none")


def scored(run) -> torch.nn.Module:
    """The weights validation and the test of last.pt score: the average when there is one."""
    return run.ema.module if run.ema is not None else run.model
