"""The GPU check: every CUDA path of mtmm run once on a GPU, unattended, in at most 8 minutes; one table, exit 1 on a
failure (2 when this machine has no CUDA device).

    python scripts/gpu_check.py [--out DIR] [--cache DIR] [--budget 480] [--only fp32,eval,...]
    python scripts/gpu_check.py --cpu-dry-run      # the same checks on CPU at tiny sizes (CUDA-only ones skipped)

Checks (in this order; each runs in its own subprocess on a GPU, with its own timeout, inside a total budget):
  fp32 bf16 fp16   the default config, device=cuda, 2 epochs, at each precision: finite losses and metrics; fp16 with
                   the gradient scaler on (its state in last.pt, its scale finite), fp32/bf16 with it off
  eval             mtmm-eval on fp32's best.pt (a subprocess) reproduces the test metrics of that run's summary.json
  ddp              NCCL: mtmm-train device.nproc_per_node=2 with two GPUs, else torchrun with one process (an NCCL
                   process group of one; mtmm wraps the model in DDP only from two processes on)
  compile          trainer.compile=true
  workers_pinned   data.num_workers=2 data.pin_memory=true: the loader's batches are page-locked, the run trains
  feature_cache    frozen resnet18 (encoder.image.freeze=true): its features computed once on the GPU, trained from
  bench_a bench_c  scripts/bench.py (a) loop overhead and (c) data wait, on the GPU (bench.py --device cuda)
  large_model      resnet50 + a BERT-base-sized random text encoder, 224 px, batch 128, bf16: samples/s, peak memory

Everything is written under --out (a new folder; a temp folder by default): per check its run folder and log, the
generated data and caches (unless --cache names another folder to reuse), and results.json.
"""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

CHECKS = ["fp32", "eval", "bf16", "fp16", "ddp", "compile", "workers_pinned", "feature_cache", "bench_a", "bench_c",
          "large_model"]
TIMEOUT_S = {"fp32": 120, "eval": 90, "bf16": 90, "fp16": 90, "ddp": 150, "compile": 210, "workers_pinned": 90,
             "feature_cache": 120, "bench_a": 150, "bench_c": 180, "large_model": 150}
CUDA_ONLY = {"fp16": "the gradient scaler is on only on CUDA", "ddp": "NCCL is CUDA only",
             "compile": "torch.compile is checked on GPU only (minutes on CPU)"}
# The default config, shortened to 2 epochs; the dry run's tiny sizes (as tests/conftest.py's TINY).
GPU_SIZES = ["trainer.epochs=2", "trainer.progress=false"]
DRY_SIZES = ["data.source.train=64", "data.source.val=32", "data.source.test=32", "data.batch_size=32",
             "data.eval_batch_size=64", "trainer.epochs=1", "trainer.progress=false", "data.num_workers=0"]
NO_CUDA = ("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with a GPU, "
           "or pass --cpu-dry-run to test the script itself on CPU")


class Skip(Exception):
    """The check does not apply here; the message says why."""


class Context:
    def __init__(self, out: Path, dry: bool, bench_full: bool):
        self.out, self.dry, self.bench_full = out, dry, bench_full
        self.device = "cpu" if dry else "cuda"
        self.base = [f"device={self.device}", *(DRY_SIZES if dry else GPU_SIZES)]
        self.bin = Path(sys.executable).parent

    def folder(self, name: str) -> Path:
        path = self.out / name
        path.mkdir(parents=True, exist_ok=True)
        return path


# ---------------------------------------------------------------- helpers

def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_module
    with initialize_config_module("mtmm.conf", version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def train_run(ctx: Context, name: str, *overrides: str) -> Path:
    """mtmm.train.train in this process on the composed config; returns the run folder."""
    from mtmm.train import train
    run_dir = ctx.folder(name) / "run"
    train(compose(*ctx.base, *overrides), run_dir=run_dir)
    return run_dir


def finite(value) -> bool:
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.isfinite(value)
    return True


def verify_run(run_dir: Path) -> dict:
    """The run's records: every loss and metric finite, no skipped batch; returns its figures."""
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("split") == "train"]
    if not train:
        raise AssertionError("metrics.jsonl has no train record")
    bad = [r["step"] for r in records if r.get("split") in ("train", "val", "test")
           and not finite({k: v for k, v in r.items() if k not in ("step", "epoch")})]
    if bad:
        raise AssertionError(f"inf/NaN in metrics.jsonl at steps {bad[:5]}")
    if summary["skipped_nonfinite_batches"]:
        raise AssertionError(f"{summary['skipped_nonfinite_batches']} batches skipped for a non-finite loss")
    last_epoch = [r for r in train if r["epoch"] == train[-1]["epoch"]]
    return {"steps": train[-1]["step"], "loss": round(train[-1]["loss"], 4),
            "samples/s": round(last_epoch[-1]["samples_per_s"]), summary["monitor"]: round(summary["monitor_value"], 4)}


def scaler_state(run_dir: Path) -> dict:
    import torch
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["scaler"]


def command(ctx: Context, name: str, argv: list[str], timeout: float, env: dict | None = None) -> str:
    """Run argv (its own process group, killed whole on timeout) with its output in <name>/command.log; returns
    that output; a non-zero exit is a failure naming the log's last line."""
    log = ctx.folder(name) / "command.log"
    with log.open("w") as file:
        process = subprocess.Popen(argv, stdout=file, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **(env or {})})
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise TimeoutError(f"{argv[0]} ran past {timeout:.0f} s; see {log}") from None
    text = log.read_text(errors="replace")
    if code != 0:
        last = next((line for line in reversed(text.splitlines()) if line.strip()), "")
        raise AssertionError(f"exit {code}: {last[:160]} (see {log})")
    return text


# ---------------------------------------------------------------- the checks (each returns its figures)

def check_precision(precision: str):
    def check(ctx: Context, timeout: float) -> dict:
        run_dir = train_run(ctx, precision, f"device.precision={precision}")
        figures = verify_run(run_dir)
        scaler = scaler_state(run_dir)
        if precision == "fp16" and not ctx.dry:
            if not scaler or "scale" not in scaler:
                raise AssertionError("fp16 on CUDA but the gradient scaler is off (no scaler state in last.pt)")
            scale = float(scaler["scale"])
            if not math.isfinite(scale) or scale <= 0:
                raise AssertionError(f"gradient scaler scale is {scale}")
            figures["scaler scale"] = scale
        elif scaler:
            raise AssertionError(f"the gradient scaler is on at {precision}")
        else:
            figures["scaler"] = "off"
        return figures
    return check


def check_eval(ctx: Context, timeout: float) -> dict:
    """mtmm-eval on fp32's best.pt, in its own process, against the test metrics that run wrote."""
    run_dir = ctx.out / "fp32" / "run"
    if not (run_dir / "summary.json").is_file():
        raise AssertionError("needs the fp32 check's run, which did not finish")
    eval_dir = ctx.folder("eval") / "run"
    command(ctx, "eval", [str(ctx.bin / "mtmm-eval"), f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}",
                          f"device={ctx.device}", f"cache_dir={os.environ['MTMM_CACHE']}", f"hydra.run.dir={eval_dir}"],
            timeout)
    got = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
    want = json.loads((run_dir / "summary.json").read_text())["best"]["test"]
    worst, compared = 0.0, 0
    for task, values in want.items():
        for key, value in values.items():
            if key == "count" or not isinstance(value, (int, float)):
                continue
            if key not in got.get(task, {}):
                raise AssertionError(f"mtmm-eval has no {task}/{key}")
            worst, compared = max(worst, abs(got[task][key] - value)), compared + 1
    if worst > 1e-3:
        raise AssertionError(f"test metrics differ from the run's by up to {worst:.2g}")
    return {"metrics compared": compared, "max |diff|": f"{worst:.1e}"}


def check_ddp(ctx: Context, timeout: float) -> dict:
    import torch
    if ctx.dry:
        raise Skip(CUDA_ONLY["ddp"])
    gpus = torch.cuda.device_count()
    run_dir = ctx.folder("ddp") / "run"
    overrides = [*ctx.base, f"hydra.run.dir={run_dir}"]
    if gpus >= 2:
        argv = [str(ctx.bin / "mtmm-train"), *overrides, "device.nproc_per_node=2"]
    else:  # one GPU: one rank under torchrun (mtmm.distributed.init picks NCCL for cuda)
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
                "mtmm.train", *overrides]
    output = command(ctx, "ddp", argv, timeout, env={"NCCL_DEBUG": "INFO"})
    if "NCCL INFO" not in output:
        raise AssertionError("no NCCL in the run's output (NCCL_DEBUG=INFO): the process group is not NCCL")
    return {"processes": min(gpus, 2), "backend": "nccl", **verify_run(run_dir),
            **({} if gpus >= 2 else {"note": "1 GPU: no DDP wrapper at world size 1"})}


def check_compile(ctx: Context, timeout: float) -> dict:
    if ctx.dry:
        raise Skip(CUDA_ONLY["compile"])
    return verify_run(train_run(ctx, "compile", "trainer.compile=true"))


def check_workers_pinned(ctx: Context, timeout: float) -> dict:
    from mtmm.run import setup
    overrides = ["data.num_workers=2", "data.pin_memory=true", "data.persistent_workers=false"]
    job = setup(compose(*ctx.base, *overrides), splits=("train",))
    loader = job.loaders["train"]
    batch = next(iter(loader))
    pinned = batch["image"].is_pinned()
    if loader.num_workers != 2:
        raise AssertionError(f"the loader has {loader.num_workers} workers, not 2")
    if not ctx.dry and not (loader.pin_memory and pinned):
        raise AssertionError(f"batches not page-locked (pin_memory={loader.pin_memory}, image pinned={pinned})")
    del job, loader
    return {"workers": 2, "pinned": pinned, **verify_run(train_run(ctx, "workers_pinned", *overrides))}


def check_feature_cache(ctx: Context, timeout: float) -> dict:
    features = ctx.folder("feature_cache") / "features"
    run_dir = train_run(ctx, "feature_cache", "encoder/image=resnet18", "encoder.image.freeze=true",
                        "trainer.feature_cache=true", f"trainer.feature_cache_dir={features}")
    log = (run_dir / "train.log").read_text()
    if "feature cache: computed" not in log:
        raise AssertionError("the run did not compute a feature cache (train.log)")
    files = [f for f in features.rglob("*") if f.is_file()]
    return {"cache files": len(files), "MiB": round(sum(f.stat().st_size for f in files) / 2**20, 1),
            **verify_run(run_dir)}


def bench_function(ctx: Context, name: str):
    """scripts/bench.py's function, called with --device's value: cuda here (cpu in the dry run, at tiny sizes)."""
    import inspect
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench
    function = getattr(bench, name)
    takes_device = "device" in inspect.signature(function).parameters
    if not ctx.dry and not takes_device:
        raise Skip(f"bench.{name} runs on CPU only: give it a device argument")
    if ctx.dry and not getattr(bench.config, "gpu_check_tiny", False):  # the same code, 64 training samples
        original = bench.config
        bench.config = lambda *overrides, **options: original(*overrides, "data.source.train=64",
                                                              "data.source.val=32", **options)
        bench.config.gpu_check_tiny = True
    return (lambda quick: function(quick, device=ctx.device)) if takes_device else function


def check_bench_a(ctx: Context, timeout: float) -> dict:
    result = bench_function(ctx, "bench_overhead")(not ctx.bench_full)
    ratio = result["overhead_ratio"]
    return {"mtmm samples/s": round(result["mtmm_samples_per_s"]), "plain samples/s": round(result["plain_samples_per_s"]),
            "overhead ratio": f"{ratio:.3f} (target <= 1.05: {'met' if ratio <= 1.05 else 'missed'})"}


def check_bench_c(ctx: Context, timeout: float) -> dict:
    result = bench_function(ctx, "bench_data_wait")(not ctx.bench_full)
    share = result["default"]["data_wait_share"]
    return {"data wait (default)": f"{100 * share:.1f}% (target <= 5%: {'met' if share <= 0.05 else 'missed'})",
            "workers": result["default"]["num_workers"],
            "decode per step": f"{100 * result['decode per step']['data_wait_share']:.1f}%"}


def check_large_model(ctx: Context, timeout: float) -> dict:
    import torch
    from mtmm.loop import Progress, to_device, train_step
    from mtmm.run import setup
    if ctx.dry:
        size, batch, text, warm, timed = 32, 8, [64, 2, 2, 128], 1, 2
    else:
        size, batch, text, warm, timed = 224, 128, [768, 12, 12, 3072], 3, 10
    hidden, layers, heads, inner = text
    cfg = compose(*ctx.base, "encoder/image=resnet18", "encoder.image.name=resnet50", "encoder/text=bert_tiny",
                  f"encoder.text.hidden_size={hidden}", f"encoder.text.num_layers={layers}",
                  f"encoder.text.num_heads={heads}", f"encoder.text.intermediate_size={inner}",
                  f"data.image_size={size}", f"data.batch_size={batch}", f"data.source.train={4 * batch}",
                  "device.precision=bf16")
    cuda = not ctx.dry
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    job = setup(cfg, splits=("train",))
    batches = [to_device(b, job.device) for b in job.loaders["train"]]  # on the device: the model's speed alone
    job.model.train()
    progress = Progress()
    for step in range(warm):
        train_step(job, batches[step % len(batches)], progress)
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for step in range(timed):
        total, _, _ = train_step(job, batches[step % len(batches)], progress)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if not math.isfinite(total.item()):
        raise AssertionError(f"loss {total.item()}")
    figures = {"params (M)": round(sum(p.numel() for p in job.model.parameters()) / 1e6, 1), "px": size,
               "batch": batch, "samples/s": round(batch * timed / seconds)}
    if cuda:
        figures["peak GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return figures


RUN = {"fp32": check_precision("fp32"), "bf16": check_precision("bf16"), "fp16": check_precision("fp16"),
       "eval": check_eval, "ddp": check_ddp, "compile": check_compile, "workers_pinned": check_workers_pinned,
       "feature_cache": check_feature_cache, "bench_a": check_bench_a, "bench_c": check_bench_c,
       "large_model": check_large_model}


# ---------------------------------------------------------------- running them

def run_in_process(ctx: Context, name: str, timeout: float) -> dict:
    """One check here, its timeout by SIGALRM; -> {result, figures}."""
    def expire(signum, frame):
        raise TimeoutError(f"ran past {timeout:.0f} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(1, int(timeout)))
    try:
        return {"result": "PASS", "figures": RUN[name](ctx, timeout)}
    except Skip as why:
        return {"result": "SKIP", "figures": {"why": str(why)}}
    except BaseException as error:  # noqa: BLE001 -- a check's failure of any kind is its row, not our crash
        if isinstance(error, KeyboardInterrupt):
            raise
        (ctx.folder(name) / "error.txt").write_text(traceback.format_exc())
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        return {"result": "FAIL", "figures": {"error": f"{type(error).__name__}: {message}"[:200]}}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_isolated(ctx: Context, name: str, timeout: float, argv: list[str]) -> dict:
    """One check in a subprocess of this script (a crash, a hang or CUDA state cannot touch the others)."""
    result = ctx.folder(name) / "result.json"
    try:
        command(ctx, name, [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", name,
                            "--timeout", str(timeout)], timeout + 15)
    except (AssertionError, TimeoutError) as error:
        if not result.is_file():
            return {"result": "FAIL", "figures": {"error": str(error)[:200]}}
    return json.loads(result.read_text())


def header(ctx: Context) -> str:
    import torch
    if ctx.dry:
        return f"mtmm GPU check -- CPU DRY RUN (tiny sizes), torch {torch.__version__}"
    names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
    return (f"mtmm GPU check -- {torch.cuda.device_count()} x {', '.join(sorted(names))}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}")


def table(rows: list[dict]) -> str:
    figures = [", ".join(f"{k} {v}" for k, v in row["figures"].items()) for row in rows]
    width = max(len("check"), *(len(row["check"]) for row in rows))
    lines = [f"{'check':<{width}}  result  seconds  figures", f"{'-' * width}  ------  -------  -------"]
    lines += [f"{row['check']:<{width}}  {row['result']:<6}  {row['seconds']:>7.1f}  {text}"
              for row, text in zip(rows, figures)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="the checks on CPU at tiny sizes (CUDA-only skipped)")
    parser.add_argument("--out", type=Path, help="a new folder for everything written (default: a temp folder)")
    parser.add_argument("--cache", type=Path, help="data/image/feature cache folder to use (default: <out>/cache)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(CHECKS)}")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all checks together (default 480)")
    parser.add_argument("--bench-full", action="store_true", help="bench.py's full sizes instead of --quick's")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="each check in its own subprocess (default: on a GPU yes, in the dry run no)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch  # before mtmm: the no-GPU answer comes in seconds
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        sys.exit(2)
    names = args.only.split(",") if args.only else CHECKS
    unknown = [name for name in names if name not in CHECKS]
    if unknown:
        parser.error(f"--only: unknown check(s) {unknown}; choose from {','.join(CHECKS)}")

    if args.worker:  # one check for a parent gpu_check; it made --out and --cache
        os.environ["MTMM_CACHE"] = str(args.cache)
        ctx = Context(args.out, args.cpu_dry_run, args.bench_full)
        outcome = run_in_process(ctx, args.worker, args.timeout)
        (ctx.folder(args.worker) / "result.json").write_text(json.dumps(outcome, default=str))
        return

    if args.out is None:
        out = Path(tempfile.mkdtemp(prefix="mtmm-gpu-check-"))
    else:
        out = args.out.resolve()
        if out.exists() and any(out.iterdir()):
            print(f"gpu_check: --out {out} exists and is not empty; give a new folder", file=sys.stderr)
            sys.exit(2)
        out.mkdir(parents=True, exist_ok=True)
    cache = (args.cache or out / "cache").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["MTMM_CACHE"] = str(cache)  # generated data, image and feature caches: never the user's own
    ctx = Context(out, args.cpu_dry_run, args.bench_full)
    isolate = (not args.cpu_dry_run) if args.isolate is None else args.isolate
    worker_argv = ["--out", str(out), "--cache", str(cache), *(["--cpu-dry-run"] if args.cpu_dry_run else []),
                   *(["--bench-full"] if args.bench_full else [])]

    started, rows = time.perf_counter(), []
    for number, name in enumerate(names, 1):
        left = args.budget - (time.perf_counter() - started)
        timeout = min(TIMEOUT_S[name], left)
        began = time.perf_counter()
        if timeout < 10:
            outcome = {"result": "FAIL", "figures": {"error": f"not run: the {args.budget:.0f} s budget is spent"}}
        elif isolate:
            outcome = run_isolated(ctx, name, timeout, worker_argv)
        else:
            outcome = run_in_process(ctx, name, timeout)
        rows.append({"check": name, **outcome, "seconds": time.perf_counter() - began})
        print(f"[{number}/{len(names)}] {name}: {outcome['result']} ({rows[-1]['seconds']:.1f} s)", file=sys.stderr,
              flush=True)

    failed = [row["check"] for row in rows if row["result"] == "FAIL"]
    (out / "results.json").write_text(json.dumps({"header": header(ctx), "checks": rows}, indent=2, default=str))
    print(header(ctx))
    print(table(rows))
    counts = {kind: sum(row["result"] == kind for row in rows) for kind in ("PASS", "FAIL", "SKIP")}
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in "
          f"{time.perf_counter() - started:.0f} s; outputs in {out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
