"""Benchmarks of mtmm, each a ratio measured side by side in one run (never a bare time):

  (a) samples/s of the mtmm training loop against a minimal hand-written loop, same model and batches (target <= 1.05)
  (b) epoch time without / with the frozen-encoder feature cache, frozen resnet18 + bert_tiny      (target >= 10)
  (c) share of step time spent waiting for data in the default config                              (target <= 5%)
  (d) peak resident memory of a training run at 10x the dataset size over 1x                       (target <= 1.2)
  (e) time per step of every loss-weighting method relative to static, at 2, 3, 4 and 8 tasks
  (f) epoch time with gradient-conflict logging every 50 steps over without, three tasks            (target <= 1.1)
  (g) epoch time with augment=light over augment=none, both reading the decoded-image cache      (target <= 1.15)
  (h) mtmm-predict samples/s over the evaluation loop's on the same rows                          (target >= 0.9)
      and onnxruntime latency over PyTorch's (CPU) at batch 1 and 64, on the exported model
  (j) LoRA (rank 8) over full fine-tuning of a ViT image encoder (hidden 192, 6 layers, 64 px): training step time,
      peak memory of the first steps, trainable parameters

    python scripts/bench.py [--only a,c] [--quick] [--device cpu|cuda|auto]

--device (default cpu) is where (a), (b), (c), (e), (f), (g) and (j) train; (d) and (h) measure CPU processes and
stay there. On a GPU, (c)'s default config loads with workers (data.num_workers=auto).
"""

import argparse
import inspect
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from mtmm.loop import Progress, fit, to_device, train_step
from mtmm.records import MetricsLog
from mtmm.run import Run
from mtmm.run import setup as setup_run
from mtmm.tasks import masked_task_loss

CACHE = Path(os.environ.get("MTMM_CACHE", Path(tempfile.gettempdir()) / "mtmm-bench"))
CPU = torch.device("cpu")


def config(*overrides, device: str = "cpu"):
    with initialize_config_module("mtmm.conf", version_base="1.3"):
        return compose("train", overrides=[f"data.source.cache_dir={CACHE}/shapes", f"data.image_cache_dir={CACHE}/images",
                                           f"device={device}", "trainer.progress=false", *overrides])


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a time read after it includes that work (CUDA runs async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(cfg) -> Run:
    """What mtmm-train builds before its loop, caches included (train and val splits), its schedule spanning every
    epoch a bench runs."""
    cfg.trainer.epochs = 20
    return setup_run(cfg, splits=("train", "val"))


def mtmm_epoch(cfg, run: Run, validate: bool = False) -> float:
    """Seconds of one epoch of mtmm's own loop (fit): training, and validation on the whole split if `validate`
    (else on one sample); checkpoints are not written."""
    loaders = dict(run.loaders)
    if not validate:
        loaders["val"] = torch.utils.data.DataLoader(torch.utils.data.Subset(run.data.datasets["val"], [0]),
                                                     collate_fn=loaders["train"].collate_fn)
    cfg.trainer.epochs = 1
    with tempfile.TemporaryDirectory() as folder:
        synchronize(run.device)
        started = time.perf_counter()
        fit(replace(run, loaders=loaders), MetricsLog(Path(folder) / "metrics.jsonl"), lambda tag, progress: None,
            Progress())
        synchronize(run.device)
        return time.perf_counter() - started


def plain_epoch(cfg, run: Run, wait: list | None = None) -> float:
    """The same epoch as a minimal hand-written PyTorch loop; `wait` collects the seconds spent waiting for data."""
    types = {task.name: task.type for task in run.data.tasks}
    model, optimizer, scheduler = run.model, run.optimizer, run.scheduler
    model.train()
    synchronize(run.device)
    started = time.perf_counter()
    batches = iter(run.loaders["train"])
    while True:
        asked = time.perf_counter()
        batch = next(batches, None)
        if wait is not None:
            wait.append(time.perf_counter() - asked)
        if batch is None:
            break
        logits = model(to_device(batch, run.device))
        loss = sum(masked_task_loss(types[t], logits[t], batch["targets"][t], batch["target_mask"][t]) for t in types)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    synchronize(run.device)
    return time.perf_counter() - started


def bench_overhead(quick: bool, device: str = "cpu") -> dict:
    cfg = config(f"data.source.train={1000 if quick else 4000}", device=device)
    parts = setup(cfg)
    plain_epoch(cfg, parts)  # warm-up: allocator, first-call costs
    mtmm_times, plain_times = [], []
    for _ in range(2 if quick else 7):  # alternate, so drift in the machine's load hits both alike
        mtmm_times.append(mtmm_epoch(cfg, parts))
        plain_times.append(plain_epoch(cfg, parts))
    # The fastest epoch of each: other work on the machine only ever adds time, and a 5% target is within the
    # spread of medians of three epochs on a shared 2-core machine (0.98-1.12 in five runs).
    samples = len(parts.loaders["train"].dataset)
    return {"mtmm_samples_per_s": samples / min(mtmm_times), "plain_samples_per_s": samples / min(plain_times),
            "overhead_ratio": min(mtmm_times) / min(plain_times),
            "overhead_ratio_of_medians": statistics.median(mtmm_times) / statistics.median(plain_times)}


def bench_data_wait(quick: bool, device: str = "cpu") -> dict:
    """The default config (images decoded once into the image cache; data.num_workers=auto: 0 on CPU, workers on a
    GPU) against decoding every step, in-process and with one loader worker; the epochs alternated so that drift in
    the machine's load hits all alike."""
    size = f"data.source.train={1000 if quick else 4000}"
    runs = {"default": config(size, device=device),
            "decode per step": config(size, "data.image_cache_gib=0", device=device),
            "decode per step, 1 worker": config(size, "data.image_cache_gib=0", "data.num_workers=1", device=device)}
    parts = {name: setup(cfg) for name, cfg in runs.items()}
    epochs = {name: [] for name in runs}
    for name, cfg in runs.items():
        plain_epoch(cfg, parts[name])  # warm-up; starts the (persistent) workers
    for _ in range(1 if quick else 3):
        for name, cfg in runs.items():
            wait: list[float] = []
            epochs[name].append((plain_epoch(cfg, parts[name], wait), sum(wait)))
    result = {}
    for name, times in epochs.items():
        result[name] = {"num_workers": parts[name].loaders["train"].num_workers,
                        "epoch_s": statistics.median(total for total, _ in times),
                        "data_wait_share": statistics.median(waited / total for total, waited in times)}
    return result


def bench_feature_cache(quick: bool, device: str = "cpu") -> dict:
    """Seconds per epoch (training + validation, in-process, after one untimed epoch) of frozen resnet18 + bert_tiny
    without the feature cache (the encoders run every step; images come from the image cache, as by default) and
    with it (computed before the timing, as a first run would), the epochs alternated; plus, for reference, without
    either cache (images decoded and encoded every step)."""
    frozen = ["encoder/image=resnet18", "encoder.image.freeze=true", "encoder.text.freeze=true",
              f"data.source.train={500 if quick else 2000}", f"trainer.feature_cache_dir={CACHE}/features"]
    runs = {"without_cache_s": config(*frozen, "trainer.feature_cache=false", device=device),
            "with_cache_s": config(*frozen, "trainer.feature_cache=true", device=device),
            "without_either_cache_s": config(*frozen, "trainer.feature_cache=false", "data.image_cache_gib=0",
                                             device=device)}
    parts = {name: setup(cfg) for name, cfg in runs.items()}
    times = {name: [] for name in runs}
    for repeat in range(2 if quick else 4):
        for name, cfg in runs.items():
            seconds = mtmm_epoch(cfg, parts[name], validate=True)
            if repeat:  # the first is a warm-up
                times[name].append(seconds)
    result = {name: statistics.median(values) for name, values in times.items()}
    return {**result, "speedup": result["without_cache_s"] / result["with_cache_s"],
            "speedup_over_no_cache": result["without_either_cache_s"] / result["with_cache_s"]}


def peak_rss_kib(overrides: list[str]) -> int:
    """Peak resident memory of one `mtmm-train` process (its own, read with wait4)."""
    command = [str(Path(sys.executable).parent / "mtmm-train"), *overrides]
    with tempfile.TemporaryDirectory() as folder:
        process = subprocess.Popen(command + [f"hydra.run.dir={folder}"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env={**os.environ, "MTMM_CACHE": str(CACHE)})
        _, status, usage = os.wait4(process.pid, 0)
        if status != 0:
            raise RuntimeError(f"{' '.join(command)} failed")
        return usage.ru_maxrss


def bench_memory(quick: bool) -> dict:
    base = 400 if quick else 1000
    # Loading in the training process, so that one process holds everything a run keeps (a loader worker is a
    # fork of it, holding the same dataset, and wait4 would not count it).
    common = ["trainer.epochs=1", "device=cpu", "trainer.progress=false", f"data.source.cache_dir={CACHE}/shapes",
              "data.num_workers=0"]
    small = peak_rss_kib([*common, f"data.source.train={base}"])
    large = peak_rss_kib([*common, f"data.source.train={10 * base}"])
    return {"train_samples": [base, 10 * base], "peak_rss_mib": [small / 1024, large / 1024], "ratio": large / small}


def bench_weighting(quick: bool, device: str = "cpu") -> dict:
    methods = ["static", "uncertainty", "dwa", "rlw", "famo", "gradnorm", "pcgrad", "cagrad", "mgda", "imtl",
               "aligned_mtl", "nash_mtl", "upgrad", "graddrop", "gradvac", "db_mtl", "fairgrad"]
    steps = 5 if quick else 15
    result = {}
    for count in (2, 3, 4, 8):  # 3 = img+txt+match, the README sweep's tasks
        # `count` tasks cycling over the shapes targets (several heads on one target are still separate tasks).
        kinds = [("img", "multiclass", "shape", "[accuracy]"), ("txt", "multiclass", "sentiment", "[accuracy]"),
                 ("match", "binary", "match", "[accuracy]")]
        tasks = []
        for k in range(count):
            name, kind, target, metrics = kinds[k % 3]
            classes = {"img": "[circle, square, triangle, star, cross, diamond]",
                       "txt": "[negative, neutral, positive]", "match": "[different, same]"}[name]
            tasks.append(f"+tasks.{name}{k}={{type: {kind}, target: {target}, classes: {classes}, weight: 1.0, "
                         f"head_hidden: [64], metrics: {metrics}}}")
        # Every method's run is set up first and their steps are then timed in rounds, one method after another,
        # so that a slow stretch of a shared machine falls on all methods alike (side by side, not one after another).
        runs, times = {}, {method: [] for method in methods}
        for method in methods:
            cfg = config("tasks=none", *tasks, f"loss={method}", "data.source.train=400",
                         "trainer.monitor=val/mean/accuracy", device=device)
            run = setup(cfg)
            run.model.train()
            runs[method] = (run, [batch for _, batch in zip(range(steps), run.loaders["train"])], Progress())
        rounds = 3
        for round_ in range(rounds):
            for method, (run, batches, progress) in runs.items():  # each run counts its own steps
                for i, batch in enumerate(batches[round_::rounds]):
                    started = time.perf_counter()
                    train_step(run, batch, progress)
                    synchronize(run.device)
                    if round_ or i >= 2:  # two warm-up steps per method
                        times[method].append(time.perf_counter() - started)
        per_step = {method: statistics.median(t) for method, t in times.items()}
        result[f"{count}_tasks"] = {method: t / per_step["static"] for method, t in per_step.items()}
    return result


def bench_conflict(quick: bool, device: str = "cpu") -> dict:
    """trainer.log_conflict_every=50 (K extra backward passes on one step in 50) against off, same model and batches,
    the epochs alternated; the fastest epoch of each, as in (a)."""
    size = f"data.source.train={1600 if quick else 6400}"  # 25 or 100 steps: the logged steps are 1 in 50
    runs = {"off": config(size, "tasks=img+txt+match", device=device),
            "every_50": config(size, "tasks=img+txt+match", "trainer.log_conflict_every=50", device=device)}
    parts = {name: setup(cfg) for name, cfg in runs.items()}
    times = {name: [] for name in runs}
    for _ in range(2 if quick else 4):
        for name, cfg in runs.items():
            times[name].append(mtmm_epoch(cfg, parts[name]))
    return {"off_s": min(times["off"]), "every_50_s": min(times["every_50"]),
            "ratio": min(times["every_50"]) / min(times["off"])}


def bench_augment(quick: bool, device: str = "cpu") -> dict:
    """Seconds per training epoch (fit, in-process) with augment=light (a random resized crop, flip and colour
    jitter per sample, on the cached rows) and with augment=none, same data, model and seed, both reading their
    images from the decoded-image cache (data.image_cache_gib, on by default; light stores the training split 1.15x
    larger); one untimed epoch each, then alternated (3 or 6 each); the fastest of each, as in (a)."""
    size = f"data.source.train={1000 if quick else 4000}"
    runs = {"none": config(size, "augment=none", device=device), "light": config(size, "augment=light", device=device)}
    parts = {name: setup(cfg) for name, cfg in runs.items()}
    for name, run in parts.items():
        if run.data.datasets["train"].image_store is None:
            raise RuntimeError(f"augment={name}: the training split did not get its decoded-image cache")
        mtmm_epoch(runs[name], run)  # warm-up
    times = {name: [] for name in runs}
    for repeat in range(3 if quick else 6):
        for name in (runs if repeat % 2 == 0 else reversed(runs)):  # either first in turn
            times[name].append(mtmm_epoch(runs[name], parts[name]))
    return {"samples": len(parts["none"].loaders["train"].dataset), "none_s": min(times["none"]),
            "light_s": min(times["light"]), "ratio": min(times["light"]) / min(times["none"]),
            "ratio_of_medians": statistics.median(times["light"]) / statistics.median(times["none"])}


def bench_predict(quick: bool) -> dict:
    """predict_file (what mtmm-predict runs: reading and checking the rows, batching, the model, writing two files)
    against what mtmm-eval runs on the same rows (reading and checking the split, then mtmm.loop.evaluate: the model
    and the metrics), one trained model, on CPU; one untimed run of each, then alternated (3 or 6 each, either first
    in turn); the fastest of each (the machine's other work only ever adds time)."""
    from mtmm.api import load_model
    from mtmm.data.build import build_data, build_loader
    from mtmm.loop import evaluate
    from mtmm.predict import predict_file
    from mtmm.train import train
    size = 1000 if quick else 4000
    cfg = config("data.source.train=200", f"data.source.test={size}", "trainer.epochs=1")
    with tempfile.TemporaryDirectory() as folder:
        train(cfg, run_dir=Path(folder) / "run")
        model = load_model(Path(folder) / "run" / "checkpoints" / "best.pt", device="cpu")
        data = build_data(cfg, splits=("test",))
        loader = build_loader(cfg, data, "test")
        manifest = data.datasets["test"].manifest  # the rows the loader reads
        runs = 0

        def predict() -> None:
            nonlocal runs
            runs += 1
            predict_file(model, manifest, Path(folder) / f"predict-{runs}", batch_size=cfg.data.eval_batch_size,
                         progress=False)

        def evaluate_split() -> None:  # mtmm-eval's work on the rows: read and check the split, then the loop
            evaluate(model.model, build_loader(cfg, build_data(cfg, splits=("test",)), "test"), model.task_specs,
                     CPU, "fp32")

        jobs = {"predict": predict, "evaluate": evaluate_split}
        times = {name: [] for name in jobs}
        for repeat in range(1 + (3 if quick else 6)):  # the first is a warm-up
            for name in (jobs if repeat % 2 == 0 else reversed(jobs)):
                started = time.perf_counter()
                jobs[name]()
                if repeat:
                    times[name].append(time.perf_counter() - started)
        latency = onnx_latency(Path(folder) / "run" / "checkpoints" / "best.pt", model.model, loader,
                               Path(folder) / "onnx")
    return {"rows": size, "predict_samples_per_s": size / min(times["predict"]),
            "evaluate_samples_per_s": size / min(times["evaluate"]),
            "ratio": min(times["evaluate"]) / min(times["predict"]),
            "ratio_of_medians": statistics.median(times["evaluate"]) / statistics.median(times["predict"]), **latency}


def vit_folder(folder: Path, hidden: int = 192, layers: int = 6, side: int = 64) -> Path:
    """A random ViT (patch 8, hidden/64 heads) with its image processor, saved as a user's local model folder."""
    import transformers
    transformers.ViTModel(transformers.ViTConfig(
        image_size=side, patch_size=8, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden)).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": side, "width": side}, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def memory_kib() -> dict:
    """This process's resident memory now and at its peak (Linux /proc/self/status), KiB."""
    status = Path("/proc/self/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", status).group(1)) for key in ("VmRSS", "VmHWM")}


def step_memory_mib(cfg, steps: int) -> float:
    """Peak memory the first `steps` training steps of a freshly set-up run add to it (gradients, optimizer state,
    activations). CUDA: the allocator's peak over what was allocated before. CPU: in a forked process (a heap the
    other run never used), the peak resident memory (its high-water mark reset before the steps) over the resident
    memory before them."""
    if cfg.device.type == "cuda":
        run = setup(cfg)
        batches = [to_device(batch, run.device) for _, batch in zip(range(steps), run.loaders["train"])]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run.model.train()
        for batch in batches:
            train_step(run, batch, Progress())
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del run, batches
        torch.cuda.empty_cache()
        return peak / 2**20
    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)

    def child() -> None:
        try:
            run = setup(cfg)
            batches = [batch for _, batch in zip(range(steps), run.loaders["train"])]
            run.model.train()
            before = memory_kib()["VmRSS"]
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            for batch in batches:
                train_step(run, batch, Progress())
            send.send((memory_kib()["VmHWM"] - before) / 1024)
        except BaseException as error:  # noqa: BLE001 -- reported by the parent
            send.send(f"{type(error).__name__}: {error}")
        finally:
            os._exit(0)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    answer = receive.recv() if receive.poll(600) else "no answer in 600 s"
    process.join()
    if isinstance(answer, str):
        raise RuntimeError(f"bench (j) memory of {cfg.encoder.image.lora.rank and 'LoRA' or 'full'}: {answer}")
    return answer


def bench_lora(quick: bool, device: str = "cpu") -> dict:
    """LoRA (encoder.image.lora.rank=8 on the attention's query/value; the base weights frozen) against full
    fine-tuning of the same random ViT image encoder (hidden 192, 6 layers, patch 8, 64 px: 65 tokens), same data,
    text encoder, fusion and heads, batch 32: seconds per training step (train_step on batches already on the
    device; 3 or 5 steps a repeat after one warm-up step, the repeats alternated, the fastest repeat of each), peak
    memory of the first 2 steps of a fresh run (step_memory_mib), and trainable parameters."""
    with tempfile.TemporaryDirectory() as folder:
        common = ["encoder/image=hf", f"encoder.image.name={vit_folder(Path(folder) / 'vit')}", "data.batch_size=32",
                  "data.source.train=256", "data.source.val=32"]
        runs = {"full": config(*common, device=device), "lora": config(*common, "encoder.image.lora.rank=8",
                                                                        device=device)}
        memory = {name: step_memory_mib(cfg, 2) for name, cfg in runs.items()}
        parts = {name: setup(cfg) for name, cfg in runs.items()}
        steps = 3 if quick else 5
        batches = {name: [to_device(batch, run.device) for _, batch in zip(range(steps + 1), run.loaders["train"])]
                   for name, run in parts.items()}
        times = {name: [] for name in runs}
        for name, run in parts.items():
            run.model.train()
            train_step(run, batches[name][0], Progress())  # warm-up: optimizer state, first-call costs
        for repeat in range(2 if quick else 4):
            for name in (runs if repeat % 2 == 0 else reversed(runs)):
                run = parts[name]
                synchronize(run.device)
                started = time.perf_counter()
                for batch in batches[name][1:]:
                    train_step(run, batch, Progress())
                synchronize(run.device)
                times[name].append((time.perf_counter() - started) / steps)
        trainable = {name: sum(p.numel() for p in run.model.parameters() if p.requires_grad)
                     for name, run in parts.items()}
        encoder = {name: sum(p.numel() for p in run.model.encoders["image"].parameters() if p.requires_grad)
                   for name, run in parts.items()}
    step = {name: min(values) for name, values in times.items()}
    # What training keeps per trainable parameter (fp32 gradient + Adam's two moments); the measured peak is
    # mostly activations, which LoRA does not shrink (it still backpropagates through every layer), and the
    # optimizer state, made after the backward pass, reuses the activations' freed memory.
    state = {name: 12 * count / 2**20 for name, count in trainable.items()}
    return {"device": str(parts["full"].device), "step_s": step, "peak_step_memory_mib": memory,
            "grad_and_adam_state_mib": state, "trainable_params": trainable, "trainable_image_encoder_params": encoder,
            "step_time_ratio": step["lora"] / step["full"], "memory_ratio": memory["lora"] / memory["full"],
            "trainable_ratio": trainable["lora"] / trainable["full"]}


def onnx_latency(checkpoint: Path, model, loader, out: Path) -> dict:
    """Median seconds per call of onnxruntime and of PyTorch on the same batch of 1 and of 64, as their ratio."""
    import onnxruntime
    from mtmm.export import export_checkpoint, positional
    export_checkpoint(checkpoint, "onnx", out)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [entry.name for entry in session.get_inputs()]
    batch = next(iter(loader))
    result = {}
    for size in (1, 64):
        part = {key: (value[:size] if isinstance(value, torch.Tensor) else {k: v[:size] for k, v in value.items()})
                for key, value in batch.items()}
        feed = {name: tensor.numpy() for name, tensor in zip(names, positional(part, model))}
        timings = {"onnxruntime": [], "pytorch": []}
        for _ in range(21):
            started = time.perf_counter()
            session.run(None, feed)
            timings["onnxruntime"].append(time.perf_counter() - started)
            started = time.perf_counter()
            with torch.no_grad():
                model(part)
            timings["pytorch"].append(time.perf_counter() - started)
        ort, pt = statistics.median(timings["onnxruntime"][1:]), statistics.median(timings["pytorch"][1:])
        result[f"batch_{size}"] = {"onnxruntime_ms": 1000 * ort, "pytorch_ms": 1000 * pt, "ratio": ort / pt}
    return result


BENCHES = {"a": ("loop overhead", bench_overhead), "b": ("feature cache", bench_feature_cache),
           "c": ("data wait", bench_data_wait), "d": ("memory", bench_memory), "e": ("weighting", bench_weighting),
           "f": ("conflict logging", bench_conflict), "g": ("augmentation", bench_augment),
           "h": ("predict", bench_predict), "j": ("LoRA vs full fine-tuning", bench_lora)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run, not the quoted figures)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="where the training benchmarks run (default cpu; (d) and (h) stay on CPU)")
    args = parser.parse_args()
    unknown = [key for key in args.only.split(",") if key not in BENCHES]
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; choose from {','.join(BENCHES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False)")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    torch.set_num_threads(torch.get_num_threads())
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = {}
    for key in args.only.split(","):
        name, bench = BENCHES[key]
        takes_device = "device" in inspect.signature(bench).parameters
        results[key] = bench(args.quick, device=device) if takes_device else bench(args.quick)
        if device != "cpu" and not takes_device:
            name += " (CPU)"
        print(f"({key}) {name}: {json.dumps(results[key], indent=None, default=float)}", flush=True)
    print(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
