"""`mtmm-export checkpoint=PATH format=safetensors|onnx out=DIR`: a trained model as a self-contained folder.

- safetensors: model.safetensors (weights only), config.yaml (the checkpoint's config, checked as mtmm/trust.py
  says), labels.json (the checkpoint's `data` entry: classes and regression statistics per task), the tokenizer
  files, text_config.json / image_config.json (a Hugging Face encoder's architecture), export.json (epoch, step, metrics) and a
  README.md model card. `load_export` reads it back into the state dict `load_checkpoint` returns, so mtmm-eval
  takes the folder wherever it takes a .pt. Reading it runs no code: safetensors, JSON and YAML, every name fixed.
- onnx: model.onnx (uint8 images, token ids, attention mask and presence flags -> per-task logits, batch and
  sequence length dynamic), checked against PyTorch with onnxruntime on a split of the checkpoint's data, with the
  same labels, tokenizer and config files, and a README.md that says how another runtime feeds it.
"""

import json
import logging
import os
import re
import shlex
import warnings
from pathlib import Path

import hydra
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mtmm.atomic import current_umask, disk_full
from mtmm.api import open_checkpoint, restore_model
from mtmm.data.build import build_data, build_loader, image_transform
from mtmm.checkpoint import FORMAT, VERSION
from mtmm.data.tokenizer import TOKENIZER_FILES, tokenizer_from_files
from mtmm.errors import UserError, exit_with
from mtmm.models.features import Features
from mtmm.records import clean
from mtmm.trust import own_cache_dirs, use_own_cache_dirs

EXPORT_FORMAT, EXPORT_VERSION = "mtmm-export", 1
# Every name an export folder may hold. A reader takes names from this list, never from inside a file.
COMMON_FILES = ("config.yaml", "labels.json", "text_config.json", "image_config.json", "README.md", "export.json")
ARCHITECTURES = ("text_config", "image_config")  # checkpoint entries kept as <entry>.json
MODEL_FILES = {"safetensors": ("model.safetensors",), "onnx": ("model.onnx", "model.onnx.data")}
# The ONNX model's inputs per modality, in MultiTaskModel.encoders order.
INPUTS = {"image": ("image", "image_present"), "text": ("input_ids", "attention_mask", "text_present")}
ONE_FILE_LIMIT = 1.5e9  # bytes of weights past which model.onnx keeps them in model.onnx.data (protobuf's 2 GB cap)


def export_checkpoint(checkpoint: str | Path, format: str, out: str | Path, split: str = "test",
                      tolerance: float = 1e-4, trusted_targets=(), cache_dir: str | Path | None = None) -> dict:
    """Write the export folder `out` (new or empty) for `checkpoint`; returns what was written (`files`, and for
    onnx the check: `max_abs_difference`, `split`, `samples`, `opset`). On any error nothing is left in `out`."""
    if format not in MODEL_FILES:
        raise UserError(f"format={format!r}; use safetensors or onnx")
    out = Path(out).expanduser()
    refuse_used(out)
    source = f"checkpoint {checkpoint}"
    state, cfg = open_checkpoint(checkpoint, trusted_targets)
    files = {"config.yaml": state["config"], "labels.json": json.dumps(labels(state), indent=2) + "\n"}
    tokenizer_files = state["data"].get("tokenizer_files") or {}
    if tokenizer_files:
        tokenizer_from_files(tokenizer_files, source)  # plain names, text, no custom code: refused here, not later
        files.update(tokenizer_files)
    for entry in ARCHITECTURES:
        if state.get(entry) is not None:
            files[f"{entry}.json"] = state[entry]
    result = {}
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        if format == "safetensors":
            save_weights(state["model"], out / "model.safetensors")
            recipe = ""
        else:
            result = export_onnx(state, cfg, out, split, tolerance, cache_dir, checkpoint)
            recipe = result.pop("recipe")
        for name, text in files.items():
            (out / name).write_text(text, encoding="utf-8")
        (out / "README.md").write_text(model_card(state, cfg, checkpoint, format, recipe), encoding="utf-8")
        # Written last: a folder without it is an interrupted export, which load_export refuses.
        meta = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "kind": format, "epoch": state["epoch"],
                "step": state["step"], "metrics": clean(state.get("metrics") or {}),
                **({"onnx_check": result} if result else {})}
        (out / "export.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    except BaseException as error:
        for path in out.iterdir():  # the folder was new or empty: everything in it is ours
            path.unlink()
        if created:
            out.rmdir()
        if disk_full(error):
            raise UserError(f"cannot write the export to {out}: the disk is full; nothing was left there") from None
        raise
    return {"files": sorted(path.name for path in out.iterdir()), **result}


def refuse_used(out: Path) -> None:
    """`out` must be new or an empty folder: an export never writes beside files it did not make."""
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} is a file; pick a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        held = sorted(path.name for path in out.iterdir())
        raise UserError(f"out={out} already holds files ({', '.join(held[:5])}{', ...' if len(held) > 5 else ''}); "
                        f"mtmm-export writes only into a new or empty folder")


def labels(state: dict) -> dict:
    """The checkpoint's data entry without the tokenizer files, which the folder holds as files of their own."""
    return {key: value for key, value in state["data"].items() if key != "tokenizer_files"}


def save_weights(weights: dict, path: Path) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415 - transformers depends on it; only an export needs it

    tensors, seen = {}, set()
    for name, tensor in weights.items():
        tensor = tensor.detach().contiguous()  # safetensors stores row-major tensors; a conv may be channels_last
        if tensor.data_ptr() in seen:  # tied weights: safetensors refuses two names for one storage
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~current_umask())  # safetensors makes it private (0600); the folder is made to be shared


def load_export(folder: Path) -> dict:
    """An export folder -> the state dict load_checkpoint returns for a .pt (format, version, config, data, model,
    text_config, image_config, epoch, step, metrics). Every name is fixed and every file is data; anything else stops in one line."""
    marker = folder / "export.json"
    if not marker.is_file() or marker.is_symlink():
        raise UserError(f"{folder} is a folder but not an mtmm export (no export.json); pass a checkpoint such as "
                        f"<run folder>/checkpoints/best.pt, or a folder written by mtmm-export")
    meta = read_json(marker, folder)
    if meta.get("format") != EXPORT_FORMAT or meta.get("version") != EXPORT_VERSION:
        raise UserError(f"export {folder}: export.json is not an mtmm export of version {EXPORT_VERSION} "
                        f"(format={meta.get('format')!r}, version={meta.get('version')!r})")
    if meta.get("kind") != "safetensors":
        raise UserError(f"export {folder} is of kind {meta.get('kind')!r} (format=onnx is for onnxruntime and other "
                        f"runtimes); mtmm reads a format=safetensors export or a .pt checkpoint")
    expected = set(COMMON_FILES) | set(MODEL_FILES["safetensors"])
    for path in sorted(folder.iterdir()):
        if path.name not in expected | TOKENIZER_FILES:
            raise UserError(f"export {folder} holds {path.name!r}, which is not a file mtmm-export writes; mtmm reads "
                            f"only {sorted(expected)} and tokenizer files there")
        if path.is_symlink() or not path.is_file():
            raise UserError(f"export {folder}: {path.name} is a link or a folder; an export holds only plain files")
    if not (isinstance(meta.get("epoch"), int) and isinstance(meta.get("step"), int)
            and isinstance(meta.get("metrics"), dict)):
        raise UserError(f"export {folder}: export.json lacks its epoch, step or metrics")
    data = read_json(folder / "labels.json", folder)
    if "tokenizer_files" in data:
        raise UserError(f"export {folder}: labels.json holds tokenizer_files; an export keeps them as files")
    tokenizer = {name: read_text(folder / name, folder) for name in sorted(TOKENIZER_FILES)
                 if (folder / name).is_file()}
    if tokenizer:
        data["tokenizer_files"] = tokenizer
    architectures = {entry: read_text(folder / f"{entry}.json", folder) if (folder / f"{entry}.json").is_file()
                     else None for entry in ARCHITECTURES}
    return {"format": FORMAT, "version": VERSION, "config": read_text(folder / "config.yaml", folder), "data": data,
            "model": read_weights(folder / "model.safetensors", folder),
            **architectures,
            "epoch": meta["epoch"], "step": meta["step"], "metrics": meta["metrics"]}


def read_text(path: Path, folder: Path) -> str:
    if not path.is_file():
        raise UserError(f"export {folder} has no {path.name} (an interrupted copy?); export it again")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"export {folder}: {path.name} is not UTF-8 text") from None


def read_json(path: Path, folder: Path) -> dict:
    try:
        value = json.loads(read_text(path, folder))
    except json.JSONDecodeError as error:
        raise UserError(f"export {folder}: {path.name} is not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(value, dict):
        raise UserError(f"export {folder}: {path.name} is not a JSON object")
    return value


def read_weights(path: Path, folder: Path) -> dict:
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    if not path.is_file():
        raise UserError(f"export {folder} has no model.safetensors (an interrupted copy?); export it again")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:  # a truncated or foreign file: its header says so
        raise UserError(f"export {folder}: model.safetensors cannot be read "
                        f"({str(error).splitlines()[0][:200]})") from None


def export_onnx(state: dict, cfg: DictConfig, out: Path, split: str, tolerance: float, cache_dir, checkpoint) -> dict:
    """out/model.onnx, checked against PyTorch with onnxruntime on `split` of the checkpoint's data; returns the
    largest difference seen and the README's recipe for feeding it."""
    source = f"checkpoint {checkpoint}"
    try:  # optional: pip install 'mtmm[export]' (torch.onnx's exporter needs onnx and onnxscript)
        import onnx  # noqa: PLC0415
        import onnxruntime  # noqa: PLC0415
        import onnxscript  # noqa: F401, PLC0415
    except ImportError as error:
        raise UserError(f"format=onnx needs onnx, onnxscript and onnxruntime ({error.name} is not installed): "
                        f"pip install 'mtmm[export]'") from None
    use_own_cache_dirs(cfg, own_cache_dirs(cache_dir))  # the data it is checked on goes to the user's cache
    data = build_data(cfg, splits=(split,), saved=state["data"], origin=source)
    model = restore_model(state, cfg, data.tasks, data.tokenizer, checkpoint)
    names = [name for modality in model.encoders for name in INPUTS[modality]]
    clash = sorted(set(names) & set(model.heads))
    if clash:
        raise UserError(f"{source}: task {clash[0]!r} has the name of an ONNX input ({names}); rename the task")
    loader = build_loader(cfg, data, split, device=torch.device("cpu"))
    example = next(iter(loader))
    if len(example["index"]) == 1:  # torch.export takes a size-1 axis for a constant: give it two samples
        example = doubled(example)
    weights = sum(tensor.numel() * tensor.element_size() for tensor in state["model"].values())
    to_onnx(model, positional(example, model), names, out / "model.onnx", weights > ONE_FILE_LIMIT, source)
    try:
        session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        worst, samples = largest_difference(session, names, model, loader)
    except Exception as error:  # noqa: BLE001 - onnxruntime's errors (a shape the graph fixed, an operator it lacks)
        raise UserError(f"{source}: onnxruntime cannot run the exported model on the {split} split "
                        f"({str(error).strip().splitlines()[0][:300]})") from None
    if not worst <= tolerance:  # also when NaN
        raise UserError(f"{source}: the ONNX model differs from PyTorch by up to {worst:.3g} on the {split} split, "
                        f"more than tolerance={tolerance}; nothing was exported")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    checked = {"max_abs_difference": worst, "split": split, "samples": samples,
               "opset": next(entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx"))}
    pad = (data.tokenizer.pad_token_id or 0) if data.tokenizer is not None else None  # as the dataset pads
    return {**checked, "recipe": feeding(cfg, model, state, example, names, pad, checked)}


def to_onnx(model: nn.Module, example: list[torch.Tensor], names: list[str], path: Path, external: bool,
            source: str) -> None:
    """torch.export with batch and sequence length dynamic, then the ONNX translation of that program. torch.onnx
    alone, when the dynamic export fails, falls back to a graph with the example's batch size fixed in it."""
    dynamic = torch.export.Dim.DYNAMIC  # range inferred from the model's code; an error, not a constant, if it fixes it
    axes = {"image": {0: dynamic}, "image_present": {0: dynamic}, "input_ids": {0: dynamic, 1: dynamic},
            "attention_mask": {0: dynamic, 1: dynamic}, "text_present": {0: dynamic}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes are not the user's
        try:
            program = torch.export.export(OnnxModel(model).eval(), tuple(example), strict=False,
                                          dynamic_shapes={"inputs": tuple(axes[name] for name in names)})
        except Exception as error:  # noqa: BLE001 - most often code that turns the batch size into a number
            raise UserError(f"{source}: torch.export cannot export this model with a dynamic batch size and sequence "
                            f"length: {why_not_dynamic(error, names)}") from None
        try:
            exported = torch.onnx.export(program, input_names=names, output_names=list(model.heads), dynamo=True,
                                         verbose=False)
        except Exception as error:  # noqa: BLE001 - an operator the translation lacks: name it in one line
            raise UserError(f"{source}: torch.onnx cannot translate this model "
                            f"({type(error).__name__}: {str(error).strip().splitlines()[0][:300]})") from None
    inputs = dict(zip(names, exported.model.graph.inputs))
    # The program's own axis names (s0, s1, ...) -> what the README calls them.
    exported.rename_axes({inputs[names[0]].shape[0]: "batch",
                          **({inputs["input_ids"].shape[1]: "sequence"} if "input_ids" in inputs else {})})
    exported.save(str(path), external_data=external)


def why_not_dynamic(error: Exception, names: list[str]) -> str:
    """torch.export's message in the user's terms: which input's axis the model's code fixed, at what size."""
    text = re.sub(r"L\['inputs'\]\[(\d+)\]\.size\(\)\[(\d+)\]",
                  lambda found: f"{names[int(found[1])]} axis {found[2]}", str(error))
    fixed = re.search(r"You marked (.+?) as dynamic but your code specialized it to be a constant \((\d+)\)", text)
    if fixed:
        return (f"the model's code fixes {fixed[1]} at {fixed[2]}, the size of the example batch (len(tensor) or "
                f"int(tensor.shape[0]) in a forward does that; tensor.shape[0] keeps it symbolic)")
    return f"{type(error).__name__}: {text.strip().splitlines()[0][:300]}"


def positional(batch: dict, model: nn.Module) -> list[torch.Tensor]:
    """A batch dict's tensors in OnnxModel's order."""
    tensors = []
    for modality in model.encoders:
        if modality == "image":
            tensors.append(batch["image"])
        else:
            tensors += [batch["text"]["input_ids"], batch["text"]["attention_mask"]]
        tensors.append(batch["present"][modality])
    return tensors


def largest_difference(session, names: list[str], model: nn.Module, loader) -> tuple[float, int]:
    """Max abs difference of every task's logits, onnxruntime vs PyTorch's own forward: every batch as loaded, then
    with alternate samples' modalities marked missing (one modality at a time), and one sample alone (the one with
    the shortest text, cut to its length: another batch size and sequence length than the export's example)."""
    worst, samples = 0.0, 0
    with torch.no_grad():
        for number, batch in enumerate(loader):
            samples += len(batch["index"])
            trials = [batch["present"]] + [{**batch["present"], modality: flags & (torch.arange(len(flags)) % 2 == 0)}
                                           for modality, flags in batch["present"].items()]
            cases = [{**batch, "present": present} for present in trials] + ([alone(batch)] if number == 0 else [])
            for case in cases:
                expected = model(case)
                got = session.run(list(model.heads), {name: tensor.numpy() for name, tensor in
                                                      zip(names, positional(case, model))})
                for task, value in zip(model.heads, got):
                    worst = max(worst, float((expected[task] - torch.from_numpy(value)).abs().max()))
    return worst, samples


def doubled(batch: dict | torch.Tensor):
    """Every tensor of a batch dict (nested) with its rows repeated once."""
    if isinstance(batch, torch.Tensor):
        return torch.cat([batch, batch])
    return {key: doubled(value) for key, value in batch.items()}


def alone(batch: dict) -> dict:
    """The batch's sample with the shortest text, as a batch of one without padding."""
    lengths = batch["text"]["attention_mask"].sum(1) if "text" in batch else torch.zeros(1, dtype=torch.long)
    row = int(lengths.argmin())
    case = {"present": {modality: flags[row:row + 1] for modality, flags in batch["present"].items()}}
    if "image" in batch:
        case["image"] = batch["image"][row:row + 1]
    if "text" in batch:
        case["text"] = {key: value[row:row + 1, :int(lengths[row])] for key, value in batch["text"].items()}
    return case


class OnnxModel(nn.Module):
    """MultiTaskModel on positional tensors, as ONNX takes them: per modality its INPUTS (image uint8 [B,3,H,W] and
    image_present bool [B]; input_ids and attention_mask int64 [B,T] and text_present bool [B]) -> one logits tensor
    per task, in model.heads order."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        given, features = iter(inputs), {}
        for modality, encoder in self.model.encoders.items():
            if modality == "image":
                encoded = encoder(next(given))
            else:
                encoded = encoder({"input_ids": next(given), "attention_mask": next(given)})
            features[modality] = with_missing(encoded, next(given), self.model.missing[modality])
        per_task = self.model.shared(self.model.fusion(features))
        return tuple(head(per_task[task]) for task, head in self.model.heads.items())


def with_missing(encoded: Features, present: torch.Tensor, missing: torch.Tensor) -> Features:
    """MultiTaskModel.mark_missing in operations a graph holds: the model skips it when every sample is present (a
    branch on data, which a graph cannot hold) and writes into slices (which ONNX does not do, and which would tie
    the sequence length to guards such as T - 1 != 1). Absent rows: the learnt `missing` vector as pooled features
    and as their one real token, the first."""
    hole = ~present[:, None]  # [B, 1]
    first = torch.arange(encoded.tokens.shape[1], device=present.device) == 0  # [T]
    missing = missing.to(encoded.pooled.dtype)
    pooled = torch.where(hole, missing, encoded.pooled)
    tokens = torch.where(hole[..., None], torch.zeros_like(encoded.tokens), encoded.tokens)
    tokens = torch.where((hole & first)[..., None], missing.to(tokens.dtype), tokens)
    mask = (encoded.mask & ~hole) | (hole & first)  # logic, not where: onnxruntime has no Where for booleans
    return Features(pooled=pooled, tokens=tokens, mask=mask)


def model_card(state: dict, cfg: DictConfig, checkpoint, format: str, recipe: str) -> str:
    """README.md: what the model predicts, how well it did, what it was trained on and with which command."""
    encoders = ", ".join(f"{m} `{cfg.encoder[m]._target_}`" for m in INPUTS if cfg.encoder[m].get("_target_"))
    lines = [f"# mtmm model ({format} export)", "",
             f"Exported from `{Path(checkpoint).name}` (epoch {state['epoch']}, step {state['step']}) by mtmm-export.",
             f"Encoders: {encoders}; fusion `{cfg.fusion._target_}`; sharing `{cfg.mtl._target_}`.", ""]
    if format == "safetensors":
        lines += ["Use it as a checkpoint: `mtmm-eval checkpoint=THIS_FOLDER`. Loading it runs no code: the weights",
                  "are safetensors, the rest JSON or YAML, and config.yaml is checked as a checkpoint's config is.", ""]
    lines += ["## Tasks", "", "| task | type | classes (index order) or [mean, std] of the target |", "|---|---|---|"]
    for task in cfg.tasks:
        kind = cfg.tasks[task].type
        classes = state["data"]["classes"][task]
        described = ", ".join(classes) if kind != "regression" else str(state["data"]["stats"][task])
        lines.append(f"| {task} | {kind} | {described} |")
    if state["data"].get("calibration"):
        lines += ["", f"Calibrated probabilities: temperatures {state['data']['calibration']} (labels.json)."]
    lines += ["", "## Metrics of the checkpoint", ""]
    for split, per_task in (state.get("metrics") or {}).items():
        for task, values in (per_task or {}).items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float))
            lines.append(f"- {split} {task}: {shown}")
    source = OmegaConf.to_container(cfg.data.source, resolve=False)
    lines += ["", "## Data", "", "```yaml", OmegaConf.to_yaml({k: v for k, v in source.items() if k != "cache_dir"})
              .strip(), "```", "", "## Training command", "", training_command(checkpoint), ""]
    return "\n".join(lines) + (("\n" + recipe) if recipe else "")


def feeding(cfg: DictConfig, model: nn.Module, state: dict, example: dict, names: list[str], pad: int,
            checked: dict) -> str:
    """The README's section on model.onnx: each input, how to make it from a file and a string, what comes out."""
    lines = ["## Feeding model.onnx", "",
             f"ONNX opset {checked['opset']}. Checked with onnxruntime against PyTorch on the {checked['split']} "
             f"split ({checked['samples']} samples, also with modalities marked missing, and one sample alone): max "
             f"abs difference {checked['max_abs_difference']:.2e}. Dynamic: `B` (batch)"
             + (", `T` (sequence length)." if "text" in model.encoders else "."),
             "", "| input | type | shape | what |", "|---|---|---|---|"]
    steps, feed = [], {}
    code = ["import numpy as np, onnxruntime", 'session = onnxruntime.InferenceSession("model.onnx")']
    if "image" in model.encoders:
        height, width = example["image"].shape[2:]
        normalize = model.encoders["image"].normalize
        mean, std = ([round(value / 255, 6) for value in buffer.flatten().tolist()]
                     for buffer in (normalize.mean, normalize.std))
        transform = image_transform(cfg)
        resize = (f"resize the shorter side to {transform.size} pixels (bilinear, antialiased), centre-crop "
                  f"{transform.side}x{transform.side}" if transform.size else "no resizing (the files were that size)")
        lines += [f"| image | uint8 | [B, 3, {height}, {width}] | RGB, channels first, 0..255, not normalised |",
                  "| image_present | bool | [B] | false: the sample has no image (its `image` row is ignored; zeros) |"]
        steps.append("- Image: open the file, turn it upright by its EXIF orientation, composite transparent pixels "
                     f"over white, convert to 8-bit RGB; {resize}. The model normalises by itself: (x / 255 - mean) / "
                     f"std, mean {mean}, std {std}.")
        code += ["from PIL import Image", 'image = np.asarray(Image.open("photo.png").convert("RGB"))'
                 '.transpose(2, 0, 1)[None]' + ("  # resized and cropped as above" if transform.size else "")]
        feed.update(image="image", image_present="np.array([True])")
    if "text" in model.encoders:
        max_length = cfg.encoder.text.get("max_length", 64)  # as build_data reads it
        lines += [f"| input_ids | int64 | [B, T] | token ids, at most {max_length}; rows padded with id {pad} |",
                  "| attention_mask | int64 | [B, T] | 1 for a real token, 0 for padding |",
                  '| text_present | bool | [B] | false: the sample has no text (encode "" for its row) |']
        if "tokenizer.json" in state["data"]["tokenizer_files"]:
            steps.append(f"- Text: tokenizer.json with Hugging Face `tokenizers`, truncated to {max_length} ids, "
                         "special tokens included (`encode` adds them).")
            code += ["from tokenizers import Tokenizer", 'tokenizer = Tokenizer.from_file("tokenizer.json")',
                     f"tokenizer.enable_truncation(max_length={max_length})", 'ids = tokenizer.encode("a caption").ids']
        else:
            steps.append(f"- Text: `transformers.AutoTokenizer.from_pretrained(THIS_FOLDER)`, "
                         f"`truncation=True, max_length={max_length}`.")
            code += ["from transformers import AutoTokenizer", 'tokenizer = AutoTokenizer.from_pretrained(".")',
                     f'ids = tokenizer("a caption", truncation=True, max_length={max_length})["input_ids"]']
        feed.update(input_ids="np.array([ids])", attention_mask="np.ones((1, len(ids)), np.int64)",
                    text_present="np.array([True])")
    calibrated = (" Calibrated: divide a task's logits by its temperature in labels.json's `calibration` first."
                  if state["data"].get("calibration") else "")
    code.append("logits = session.run(None, {" + ", ".join(f'"{name}": {feed[name]}' for name in names) + "})")
    lines += ["", *steps, "", "Outputs: one float32 [B, K] tensor of logits per task, named as the task. multiclass: "
              "softmax over labels.json's classes; binary: the sigmoid of its one output is the probability of its "
              "second class; multilabel: a sigmoid per label, above 0.5 = on; regression: value * std + mean with "
              f"labels.json's stats [mean, std].{calibrated}", "", "```python", *code, "```", ""]
    return "\n".join(lines)


def training_command(checkpoint) -> str:
    """From the run folder's .hydra/overrides.yaml (Hydra writes it beside checkpoints/), when there is one."""
    overrides = Path(checkpoint).expanduser().resolve().parent.parent / ".hydra" / "overrides.yaml"
    try:
        given = yaml.safe_load(overrides.read_text(encoding="utf-8"))  # plain data: lists and strings
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # only shown, never needed
        given = None
    if not isinstance(given, list) or not all(isinstance(item, str) and "\n" not in item for item in given):
        return "Not recoverable: the checkpoint's run folder has no readable .hydra/overrides.yaml."
    return "```bash\nmtmm-train " + " ".join(shlex.quote(item) for item in given) + "\n```"


@hydra.main(version_base="1.3", config_path="pkg://mtmm.conf", config_name="export")
def hydra_main(cfg: DictConfig) -> None:
    try:
        result = export_checkpoint(cfg.checkpoint, cfg.format, cfg.out, split=cfg.split, tolerance=cfg.tolerance,
                                   trusted_targets=cfg.trusted_targets, cache_dir=cfg.cache_dir)
    except UserError as error:
        exit_with(error)
    if "max_abs_difference" in result:
        print(f"onnxruntime vs PyTorch, {result['samples']} samples of the {cfg.split} split: max abs difference "
              f"{result['max_abs_difference']:.2e}")
    print(f"export folder: {Path(cfg.out).expanduser().resolve()} ({', '.join(result['files'])})")


def main() -> None:
    # The ONNX optimizer logs each rewrite (and each fold it skips) at INFO and WARNING: that is not the user's to
    # act on, and would bury mtmm's own lines; what goes wrong there raises, and is reported in one line.
    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    hydra_main()


if __name__ == "__main__":
    main()
