"""Use a trained model from Python: `load_model("best.pt")` -> a Predictor with `predict`, `embed` and `tasks`.

    from mtmm import load_model
    model = load_model("outputs/.../checkpoints/best.pt", device="auto")
    model.predict(images=["photo.jpg", None], texts=["a red bicycle", "a kitchen table"])
    # -> [{"img": {"prediction": "circle", "probabilities": {...}}, ...}, ...]

The checkpoint may come from anyone: it is loaded as mtmm-eval loads it (mtmm/trust.py), and nothing but it is read
(no dataset, no pretrained files).
"""

from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.functional import to_pil_image

from mtmm.build import build_model, has_encoder
from mtmm.data.build import image_transform
from mtmm.checkpoint import load_checkpoint
from mtmm.data.collate import pad_token_ids
from mtmm.data.images import open_image
from mtmm.data.tokenizer import tokenizer_from_files
from mtmm.device import autocast, one_thread, resolve_device
from mtmm.errors import UserError
from mtmm.tasks import TaskSpec, build_tasks
from mtmm.trust import check_saved_data, trusted_config


def open_checkpoint(checkpoint: str | Path, trusted_targets=()) -> tuple[dict, object]:
    """The checkpoint's contents and its config, checked as anything from outside is (mtmm/trust.py)."""
    state = load_checkpoint(checkpoint)
    cfg = trusted_config(state.get("config"), f"checkpoint {checkpoint}", trusted_targets)
    check_saved_data(state, cfg, f"checkpoint {checkpoint}")
    return state, cfg


def restore_model(state: dict, cfg, tasks: list[TaskSpec], tokenizer, checkpoint) -> torch.nn.Module:
    """The network the config describes, with the checkpoint's weights (no pretrained file is read)."""
    model = build_model(cfg, tasks, tokenizer, checkpoint=state)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise UserError(f"checkpoint {checkpoint}: its weights do not fit the model its config describes "
                        f"({str(error).splitlines()[0]})") from None
    return model.eval()


def predicted_batch(task: TaskSpec, logits: torch.Tensor) -> list[dict]:
    """Per row of a batch's logits [B, outputs], the prediction for one task: class name(s) with the probabilities
    (six digits), or the value in the target's units; the probabilities computed once for the batch."""
    with one_thread():  # [B, classes] is tiny: a second thread only waits (ms per call on a loaded machine)
        return rows_predicted(task, logits)


def rows_predicted(task: TaskSpec, logits: torch.Tensor) -> list[dict]:
    if task.type == "regression":
        return [{"prediction": value * task.std + task.mean} for value in logits[:, 0].tolist()]
    logits = logits / task.temperature
    if task.type == "multilabel":
        rows = torch.sigmoid(logits).tolist()
        return [{"prediction": [name for name, p in zip(task.classes, row) if p > 0.5],
                 "probabilities": [round(p, 6) for p in row]} for row in rows]
    if task.type == "binary":
        positive = torch.sigmoid(logits[:, 0])
        rows = torch.stack([1 - positive, positive], dim=1).tolist()
    else:
        rows = torch.softmax(logits, dim=-1).tolist()
    return [{"prediction": task.classes[max(range(len(row)), key=row.__getitem__)],
             "probabilities": [round(p, 6) for p in row]} for row in rows]


class Predictor:
    """A trained model and what it needs to turn raw inputs into predictions: the tokenizer and image transform
    it was trained with, its tasks' class names and statistics."""

    def __init__(self, checkpoint: str | Path, device: str = "auto", trusted_targets=()):
        state, cfg = open_checkpoint(checkpoint, trusted_targets)
        self.cfg, self.device = cfg, resolve_device(device)
        self.task_specs = build_tasks(cfg, None, saved=state["data"])
        self.tokenizer = (tokenizer_from_files(state["data"]["tokenizer_files"], f"checkpoint {checkpoint}")
                          if has_encoder(cfg, "text") else None)
        self.transform = image_transform(cfg) if has_encoder(cfg, "image") else None
        self.max_length = cfg.encoder.text.get("max_length", 64)
        precision = cfg.device.precision  # what it was trained with; fp16 is for GPUs only
        self.precision = "fp32" if precision == "fp16" and self.device.type != "cuda" else precision
        self.model = restore_model(state, cfg, self.task_specs, self.tokenizer, checkpoint).to(self.device)

    @property
    def tasks(self) -> list[dict]:
        """Each task's name, type, class names (empty for regression) and metrics."""
        return [{"name": t.name, "type": t.type, "classes": list(t.classes), "metrics": list(t.metrics)}
                for t in self.task_specs]

    def batch(self, images=None, texts=None) -> dict:
        """Raw inputs -> the batch dict the model takes (DESIGN.md), as training batched them. `images`: paths, PIL
        images or uint8 tensors [3, H, W]; `texts`: strings; None (or "") for a missing one."""
        count = len(images) if images is not None else len(texts) if texts is not None else 0
        if count == 0 or (images is not None and texts is not None and len(images) != len(texts)):
            raise UserError("predict: give images and/or texts, lists of the same length (None for a missing one)")
        batch = {"index": torch.arange(count), "present": {}}
        if self.transform is not None:
            images = images if images is not None else [None] * count
            decoded = [None if image is None else self.pixels(image, n) for n, image in enumerate(images)]
            shapes = {tensor.shape for tensor in decoded if tensor is not None}
            if len(shapes) > 1:
                raise UserError(f"predict: images of different sizes {sorted(shapes)}; the model was trained "
                                f"without data.image_size, so every image must have the size it was trained at")
            side = self.transform.side
            blank = torch.zeros(next(iter(shapes)) if shapes else (3, side or 1, side or 1), dtype=torch.uint8)
            batch["image"] = torch.stack([blank if tensor is None else tensor for tensor in decoded])
            batch["present"]["image"] = torch.tensor([tensor is not None for tensor in decoded])
        if self.tokenizer is not None:
            texts = texts if texts is not None else [None] * count
            ids = self.tokenizer([str(text or "") for text in texts], truncation=True,
                                 max_length=self.max_length)["input_ids"]
            batch["text"] = pad_token_ids(ids, self.tokenizer.pad_token_id or 0)
            batch["present"]["text"] = torch.tensor([bool(text) for text in texts])
        return batch

    def pixels(self, image, number: int) -> torch.Tensor:
        if isinstance(image, (str, Path)):
            path = Path(image).expanduser()
            if not path.is_file():
                raise UserError(f"predict: image {number} ({path}) does not exist")
            try:
                with open_image(path, f"predict: image {number}") as opened:
                    return self.transform(opened)
            except OSError as error:
                raise UserError(f"predict: cannot read image {path}: {error}") from None
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
                raise UserError(f"predict: image {number} is a {image.dtype} tensor of shape {tuple(image.shape)}; "
                                f"give uint8 [3, H, W]")
            image = to_pil_image(image)
        if not isinstance(image, Image.Image):
            raise UserError(f"predict: image {number} is a {type(image).__name__}; give a path, a PIL image or a "
                            f"uint8 tensor")
        return self.transform(image)

    def logits(self, batch: dict) -> dict[str, torch.Tensor]:
        """The model's outputs per task [B, outputs], float, on the CPU. Under inference_mode (no autograd
        bookkeeping at all: a few % faster than no_grad on CPU); the results are cloned out of it, plain tensors."""
        batch = {key: value.to(self.device) if isinstance(value, torch.Tensor) else
                 {k: v.to(self.device) for k, v in value.items()} for key, value in batch.items()}
        with torch.inference_mode(), autocast(self.device, self.precision):
            logits = {task: value.float().cpu() for task, value in self.model(batch).items()}
        return {task: value.clone() for task, value in logits.items()}

    def predict(self, images=None, texts=None, batch_size: int = 64) -> list[dict]:
        """One dict per sample: {task: {"prediction": ..., "probabilities": [...]}} (class names in `tasks` order)."""
        results = []
        count = len(images) if images is not None else len(texts or [])
        for start in range(0, count, batch_size):
            part = lambda values: None if values is None else values[start:start + batch_size]  # noqa: E731
            logits = self.logits(self.batch(part(images), part(texts)))
            per_task = {task.name: predicted_batch(task, logits[task.name]) for task in self.task_specs}
            results += [dict(zip(per_task, row)) for row in zip(*per_task.values())]
        return results

    @torch.no_grad()
    def embed(self, images=None, texts=None) -> torch.Tensor:
        """The fused representation h [N, H] of the inputs (what the shared layers and heads read)."""
        self.logits(self.batch(images, texts))
        return self.model.fused.float().cpu().clone()  # out of inference_mode (see logits)


def load_model(checkpoint: str | Path, device: str = "auto", trusted_targets=()) -> Predictor:
    """A Predictor for the model in `checkpoint` (a best.pt or last.pt written by mtmm-train)."""
    return Predictor(checkpoint, device=device, trusted_targets=trusted_targets)
