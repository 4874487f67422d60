"""Feature probes for `match` (does the caption name the drawn colour?) on trained shapes checkpoints.

For each checkpoint: the image encoder's pooled features, the text encoder's, the fused representation h and the
shared layers' output are collected on the training and test splits; probes fitted on train are scored on test:

  drawn colour (6 classes) and caption colour (6 classes): linear probes (logistic regression) -- is the colour
  each modality carries still there?  match: a linear probe and a one-hidden-layer MLP probe -- equality of two
  colours is not linear in h = a_img f_img + a_txt f_txt, so the MLP says whether the information is there at all.

    python scripts/match_probe.py RUN_OR_CHECKPOINT [...] [--epochs 300]
    python scripts/match_probe.py --gradients RUN [...]     # runs trained with trainer.log_conflict_every=N

Prints a Markdown table (test accuracy of each probe; chance: colour 1/6, match 1/2) and the late-fusion weights;
with --gradients instead, per block of epochs each task's mean gradient norm on the shared parameters, the mean
pairwise cosines and the mean training losses, from the run's metrics.jsonl.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from mtmm.api import open_checkpoint, restore_model
from mtmm.build import instantiate
from mtmm.data.build import build_data, build_loader
from mtmm.data.shapes import COLOURS
from mtmm.loop import to_device

COLOUR_INDEX = {name: i for i, name in enumerate(COLOURS)}


@torch.no_grad()
def collect(model, loader, records: list[dict]) -> dict[str, torch.Tensor]:
    """Representations and colour/match targets of every sample of the loader's split, in file order."""
    model.eval()
    parts: dict[str, list] = {}
    for batch in loader:
        batch = to_device(batch, torch.device("cpu"))
        features = model.encode(batch)
        fused = model.fusion(features)
        shared = next(iter(model.shared(fused).values()))
        rows = [records[int(i)] for i in batch["index"]]
        found = {f"{m} encoder": f.pooled for m, f in features.items()} | {"fused h": fused, "shared": shared}
        found |= {"drawn colour": torch.tensor([COLOUR_INDEX[r["colour"]] for r in rows]),
                  "caption colour": torch.tensor([COLOUR_INDEX[r["caption_colour"]] for r in rows]),
                  "match": torch.tensor([int(r["match"]) for r in rows])}
        for name, value in found.items():
            parts.setdefault(name, []).append(value.float() if value.is_floating_point() else value)
    return {name: torch.cat(values) for name, values in parts.items()}


def probe(x_train, y_train, x_test, y_test, hidden: int = 0, epochs: int = 300, seed: int = 0) -> float:
    """Test accuracy of a probe (linear, or an MLP with `hidden` units) fitted full-batch with Adam on train."""
    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    classes = int(y_train.max()) + 1
    net = (nn.Sequential(nn.Linear(x_train.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, classes)) if hidden
           else nn.Linear(x_train.shape[1], classes))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x_train), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        return float((net(x_test).argmax(1) == y_test).float().mean())


def gradients(folder: Path, blocks=((1, 2), (3, 4), (5, 8), (9, 12))) -> None:
    """Mean gradient norms, cosines and training losses per block of epochs, from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if r.get("split") == "conflict"]
    trained = [r for r in rows if r.get("split") == "train"]
    tasks, pairs = list(logged[0]["norms"]), list(logged[0]["cosine"])
    columns = [f"|g {t}|" for t in tasks] + [f"cos {p}" for p in pairs] + [f"loss {t}" for t in tasks]
    print(f"\n{folder}\n\n| epochs | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * (2 * len(tasks) + len(pairs)))
    for low, high in blocks:
        part = [r for r in logged if low <= r["epoch"] <= high]
        steps = [r for r in trained if low <= r["epoch"] <= high]
        if not part:
            continue
        cells = [statistics.mean(r["norms"].get(t, 0.0) for r in part) for t in tasks]
        cells += [statistics.mean(r["cosine"].get(p, 0.0) for r in part) for p in pairs]
        cells += [statistics.mean(r[t]["loss"] for r in steps) for t in tasks]
        print(f"| {low}–{high} | " + " | ".join(f"{c:.3g}" for c in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="run folders (their best.pt) or checkpoint files")
    parser.add_argument("--epochs", type=int, default=300, help="full-batch steps of each probe")
    parser.add_argument("--gradients", action="store_true", help="summarise the runs' gradient logs instead")
    args = parser.parse_args()
    if args.gradients:
        for folder in args.checkpoints:
            gradients(folder)
        return
    torch.set_grad_enabled(True)
    print("| checkpoint | representation | drawn colour (linear) | caption colour (linear) | match (linear) "
          "| match (MLP probe) |")
    print("|---|---|---|---|---|---|")
    notes = []
    for given in args.checkpoints:
        path = given / "checkpoints" / "best.pt" if given.is_dir() else given
        state, cfg = open_checkpoint(path)
        data = build_data(cfg, splits=("train", "test"), saved=state["data"], origin=f"checkpoint {path}")
        model = restore_model(state, cfg, data.tasks, data.tokenizer, path)
        records = instantiate(cfg.data.source).records
        train, test = (collect(model, build_loader(cfg, data, split), records[split]) for split in ("train", "test"))
        name = given.name if given.is_dir() else str(given)
        for rep in [key for key in train if key not in ("drawn colour", "caption colour", "match")]:
            cells = [probe(train[rep], train[t], test[rep], test[t], epochs=args.epochs)
                     for t in ("drawn colour", "caption colour", "match")]
            cells.append(probe(train[rep], train["match"], test[rep], test["match"], hidden=256, epochs=args.epochs))
            print(f"| {name} | {rep} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
        if hasattr(model.fusion, "alpha"):
            alpha = model.fusion.alpha().tolist()
            notes.append(f"{name}: late-fusion weights " + ", ".join(
                f"{m} {a:.3f}" for m, a in zip(model.fusion.modalities, alpha)))
    print("\n".join(["", *notes]))


if __name__ == "__main__":
    sys.exit(main())
