"""Device and precision selection."""

import contextlib

import torch

from mtmm.errors import UserError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(kind: str) -> torch.device:
    """auto -> cuda, else mps, else cpu; an explicit kind must be present on this machine."""
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if kind not in available:
        raise UserError(f"device.type={kind!r} is not known; use one of auto, cpu, cuda, mps")
    if not available[kind]:
        raise UserError(f"device.type={kind} was asked for but this machine has none; use device=auto or device=cpu")
    return torch.device(kind)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for bf16/fp16, nothing for fp32."""
    if precision not in PRECISIONS:
        raise UserError(f"device.precision={precision!r} is not known; use one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def one_thread():
    """torch on one thread for the block: work on tiny tensors (per-sample augmentation, a batch's softmax) pays more
    for waking a second thread than it gains, several times over on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
