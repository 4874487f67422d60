"""Benchmark (i): start-up at scale. Time from the start of a process to the end of its first training step, and the
process's peak resident memory (VmHWM; also its anonymous, non-file memory), at three dataset sizes, for
data=manifest, data=hf and data=webdataset; printed as
the growth from the smallest size to the largest (targets: time <= 10x, memory <= 2x at 100x the samples).

    python scripts/bench_scale.py [--quick] [--sources manifest,hf,webdataset] [--dir DIR]

Sizes: 10^4, 10^5, 10^6 training samples (--quick: 10^3, 10^4, 10^5); validation and test stay at 1000 each.
Images: a pool of 64 generated 16 px PNGs, reused by every row (the manifest names the pool's files; hf and
webdataset store each row's own copy of the bytes), so that writing 10^6 samples takes seconds, not hours.
Each measurement is its own process (setup(cfg) as mtmm-train builds a run, then one train_step), on a tiny model.
hf and webdataset are measured twice: cold (nothing cached: the one streamed pass that learns the labels and the
vocabulary, and for webdataset the shard index, happen in it) and warm (a second run on the same data). The
manifest runs with data.image_cache_gib=0 (its default, 8 GiB, would also decode every image before the first step).
Data are generated once under --dir (default: $MTMM_CACHE/bench-scale) and kept for the next run.
"""

import time

STARTED = time.perf_counter()  # before the heavy imports: they are part of what a user waits for

import argparse  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 40, 230)}
POOL = 64
HELD_OUT = 1000
SHARD = 10_000  # samples per webdataset shard
TINY = ["trainer.epochs=1", "trainer.progress=false", "device=cpu", "data.batch_size=32", "data.num_workers=0",
        "data.image_size=16", "encoder.image.channels=[8,16,32]", "encoder.text.hidden_size=32",
        "encoder.text.intermediate_size=64", "tasks=none",
        "+tasks.colour={type: multiclass, target: colour, weight: 1.0, head_hidden: [16], metrics: [accuracy]}"]


def pool() -> list[tuple[str, bytes]]:
    """(colour, PNG bytes) of POOL small noisy images."""
    from PIL import Image
    rng = random.Random(0)
    images = []
    for k in range(POOL):
        colour = sorted(COLOURS)[k % 3]
        image = Image.new("RGB", (16, 16), COLOURS[colour])
        image.putdata([tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in COLOURS[colour]) for _ in range(256)])
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append((colour, buffer.getvalue()))
    return images


def rows(count: int, seed: int):
    """(id, pool index, caption) of `count` rows."""
    rng = random.Random(seed)
    words = ["small", "bright", "dark", "noisy", "square", "picture", "photo", "of", "a", "the"]
    for i in range(count):
        k = rng.randrange(POOL)
        yield f"s{i}", k, f"{' '.join(rng.choices(words, k=4))} {sorted(COLOURS)[k % 3]}"


def make_manifest(folder: Path, count: int, images) -> list[str]:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for k, (_, data) in enumerate(images):
        (folder / "images" / f"p{k}.png").write_bytes(data)
    for split, size, seed in (("train", count, 0), ("val", HELD_OUT, 1), ("test", HELD_OUT, 2)):
        with (folder / f"{split}.csv").open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["id", "image", "text", "colour"])
            for sample, k, caption in rows(size, seed):
                writer.writerow([sample, f"images/p{k}.png", caption, images[k][0]])
    return ["data=manifest", f"data.source.train={folder}/train.csv", f"data.source.val={folder}/val.csv",
            f"data.source.test={folder}/test.csv", "data.image_cache_gib=0"]


def make_hf(folder: Path, count: int, images) -> list[str]:
    import datasets
    import pyarrow as pa
    datasets.disable_progress_bars()
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "text": datasets.Value("string"), "colour": datasets.Value("string")})
    parts = {}
    for split, size, seed in (("train", count, 0), ("validation", HELD_OUT, 1), ("test", HELD_OUT, 2)):
        every, chunks = list(rows(size, seed)), []
        for start in range(0, size, 100_000):  # Arrow chunks of 100 000 rows: the bytes are copied once, into Arrow
            batch = every[start: start + 100_000]
            chunks.append(pa.table({
                "id": [b[0] for b in batch],
                "image": pa.array([{"bytes": images[b[1]][1], "path": None} for b in batch],
                                  type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                "text": [b[2] for b in batch], "colour": [images[b[1]][0] for b in batch]}))
        parts[split] = datasets.Dataset(pa.concat_tables(chunks)).cast(features)
    datasets.DatasetDict(parts).save_to_disk(str(folder / "dataset"))
    return ["data=hf", f"data.source.path={folder}/dataset"]


def make_webdataset(folder: Path, count: int, images) -> list[str]:
    import webdataset as wds
    folder.mkdir(parents=True, exist_ok=True)
    for split, size, seed in (("train", count, 0), ("val", HELD_OUT, 1), ("test", HELD_OUT, 2)):
        sink, written = None, 0
        for sample, k, caption in rows(size, seed):
            if written % SHARD == 0:
                if sink is not None:
                    sink.close()
                sink = wds.TarWriter(str(folder / f"{split}-{written // SHARD:04d}.tar"))
            sink.write({"__key__": f"{written:08d}", "png": images[k][1],
                        "json": json.dumps({"id": sample, "text": caption, "colour": images[k][0]}).encode()})
            written += 1
        sink.close()
    return ["data=webdataset", f"data.source.train={folder}/train-*.tar", f"data.source.val={folder}/val-*.tar",
            f"data.source.test={folder}/test-*.tar"]


MAKERS = {"manifest": make_manifest, "hf": make_hf, "webdataset": make_webdataset}


def prepare(root: Path, source: str, count: int) -> list[str]:
    """The data of (source, count) under root, made once; the overrides that point a run at them."""
    folder = root / f"{source}-{count}"
    marker = folder / "overrides.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    # In a process of its own: the rows and Arrow tables it builds stay out of this one, whose size every measured
    # child would otherwise start from.
    subprocess.run([sys.executable, __file__, "--make", source, str(count), str(folder)], check=True)
    overrides = json.loads(marker.read_text())
    print(f"  made {source} with {count:,} samples in {time.perf_counter() - started:.0f} s", flush=True)
    return overrides


def first_step(overrides: list[str], cache: str) -> dict:
    """In this (fresh) process: build the run as mtmm-train does, take one training step; seconds and peak RSS."""
    os.environ["MTMM_CACHE"] = cache
    from hydra import compose, initialize_config_module

    from mtmm.loop import Progress, train_step
    from mtmm.run import setup
    with initialize_config_module("mtmm.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, *overrides])
    run = setup(cfg)
    loader = run.loaders["train"]
    loader.sampler.set_epoch(1)
    train_step(run, next(iter(loader)), Progress())
    return {"seconds": time.perf_counter() - STARTED, "rss_mib": peak_rss_mib(), "anon_mib": anonymous_mib()}


def anonymous_mib() -> float:
    """Resident memory that is not file pages (RssAnon, now): a memory-mapped Arrow file's pages count in RSS
    once read, but they are the page cache, shared and dropped under pressure, not memory the process holds."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec
    from the forking parent, so a child would report at least the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: no parent inflates it there


def measure(overrides: list[str], cache: Path) -> dict:
    output = subprocess.run([sys.executable, __file__, "--child", json.dumps(overrides), str(cache)],
                            capture_output=True, text=True)
    if output.returncode != 0:
        raise SystemExit(f"the measured run failed:\n{output.stdout[-3000:]}\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10^3, 10^4, 10^5 samples instead of 10^4 .. 10^6")
    parser.add_argument("--sources", default="manifest,hf,webdataset", help="comma-separated")
    parser.add_argument("--dir", default=None, help="where the generated data are kept")
    parser.add_argument("--manifest-up-to", type=int, default=10**5,
                        help="largest size measured for the manifest source (it verifies every image and tokenises "
                             "every text before the first step: about 20 min at 10^6 on 2 cores)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--make", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        folder = Path(args.make[2])
        overrides = MAKERS[args.make[0]](folder, int(args.make[1]), pool())
        (folder / "overrides.json").write_text(json.dumps(overrides))
        return
    if args.child:
        print(json.dumps(first_step(json.loads(args.child[0]), args.child[1])))
        return
    sizes = [10**3, 10**4, 10**5] if args.quick else [10**4, 10**5, 10**6]
    root = Path(args.dir or Path(os.environ.get("MTMM_CACHE", Path(tempfile.gettempdir()) / "mtmm-bench"))
                / "bench-scale").expanduser()
    results = {}
    for source in args.sources.split(","):
        for count in sizes:
            if source == "manifest" and count > args.manifest_up_to:
                print(f"{source:>10} {count:>9,}: not measured (--manifest-up-to {args.manifest_up_to:,})")
                continue
            overrides = prepare(root, source, count)
            with tempfile.TemporaryDirectory(prefix="mtmm-bench-cache-") as cache:
                runs = {"cold": measure(overrides, Path(cache))}
                if source != "manifest":  # the manifest source caches nothing between runs
                    runs["warm"] = measure(overrides, Path(cache))
            results[(source, count)] = runs
            print(f"{source:>10} {count:>9,}: " + "  ".join(
                f"{kind} {r['seconds']:6.1f} s {r['rss_mib']:6.0f} MiB (anon {r['anon_mib']:5.0f})"
                for kind, r in runs.items()), flush=True)
    print(f"\ngrowth from {sizes[0]:,} samples (targets at {sizes[-1]:,}: time <= 10x, memory <= 2x)")
    for source in args.sources.split(","):
        largest = max(count for (name, count) in results if name == source)
        for kind in results[(source, sizes[0])]:
            small, large = results[(source, sizes[0])][kind], results[(source, largest)][kind]
            time_ratio, memory_ratio = large["seconds"] / small["seconds"], large["rss_mib"] / small["rss_mib"]
            verdict = "ok" if time_ratio <= 10 and memory_ratio <= 2 else "MISSES"
            verdict = verdict if largest == sizes[-1] else f"(only up to {largest:,}: {verdict} so far)"
            anon_ratio = large["anon_mib"] / small["anon_mib"]
            print(f"{source:>10} {kind:>4} to {largest:>9,}: time x{time_ratio:5.1f}  memory x{memory_ratio:4.2f} "
                  f"(anon x{anon_ratio:4.2f})  {verdict}")


if __name__ == "__main__":
    main()
