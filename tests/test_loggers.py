"""Experiment trackers with the real libraries, read back with their own readers: TensorBoard (EventAccumulator),
MLflow (MlflowClient on the file store in the run folder), W&B (offline run files), CSV; and resume."""

import csv
import json
import os
import shutil

import pytest
import torch
from hydra import compose, initialize_config_module

from mtmm.loggers import record_step, scalars
from mtmm.train import train
from tests.conftest import TINY

os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
LOGGERS = "logger=[tensorboard,mlflow,wandb,csv]"


def compose_tiny(folder, *overrides):
    with initialize_config_module("mtmm.conf", version_base="1.3"):
        return compose("train", overrides=[f"data.source.cache_dir={folder / 'data'}", *TINY, *overrides])


def expected(run_dir) -> dict[str, dict[int, float]]:
    """name -> {step: value} as metrics.jsonl says (test records at the last step)."""
    out, last = {}, 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        step = record_step(record, last)
        last = max(last, step)
        for name, value in scalars(record).items():
            out.setdefault(name, {})[step] = value
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("loggers")
    try:
        train(compose_tiny(folder, LOGGERS, "trainer.log_conflict_every=2"), run_dir=folder / "run")
    finally:  # the tests after this module train with the machine's threads, as they do run alone
        torch.set_num_threads(threads)
    return folder / "run"


def test_tensorboard_scalars_and_steps_equal_metrics_jsonl(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    want = expected(run)
    assert set(events.Tags()["scalars"]) == set(want)
    for name, values in want.items():
        got = {e.step: e.value for e in events.Scalars(name)}
        assert got == pytest.approx(values, rel=1e-6), name
    assert {"train/loss", "train/lr", "train/samples_per_s", "val/img/accuracy", "test/best/txt/accuracy"} <= set(want)
    assert any(name.startswith("train/weights/") for name in want) and any(n.startswith("conflict/") for n in want)


def test_mlflow_file_store_has_params_and_metric_history(run):
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    run_id = (run / "mlflow-run-id").read_text().strip()
    data = client.get_run(run_id).data
    assert data.params["trainer.epochs"] == "2" and data.params["seed"] == "0"
    assert data.tags["best_checkpoint"] == str(run / "checkpoints" / "best.pt")
    for name, values in expected(run).items():
        history = client.get_metric_history(run_id, name)
        assert {m.step: m.value for m in history} == pytest.approx(values, rel=1e-6), name
        assert len(history) == len(values), name  # no step twice


def wandb_records(path):
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks, each
    with a 7-byte header (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last), as LevelDB's log."""
    data, block, position, parts = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", path
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            break
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            yield parts


def wandb_history(run) -> list[dict]:
    """The history rows of every offline run under run/wandb, read with W&B's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2
    rows = []
    for path in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_history(run):
    rows = wandb_history(run)
    want = expected(run)
    got = {}
    for row in rows:
        for name, value in row.items():
            if not name.startswith("_") and not name.startswith("trainer/"):
                got.setdefault(name, {})[row["trainer/step"]] = value
    assert set(got) == set(want)
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-6), name
    records = [row["trainer/record"] for row in rows]
    assert len(records) == len(set(records))


def test_csv_equals_metrics_jsonl(run):
    with (run / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    want = [(str(i), name, value) for i, record in enumerate(records) for name, value in scalars(record).items()]
    assert [(r["record"], r["name"], float(r["value"])) for r in rows] == want


def tracker_points(run_dir) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """tracker -> name -> [(step, value), ...] in the order each tracker holds them."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = (run_dir / "mlflow-run-id").read_text().strip()
    out = {"tensorboard": {n: [(e.step, e.value) for e in events.Scalars(n)] for n in events.Tags()["scalars"]},
           "mlflow": {}, "wandb": {}}
    for name in events.Tags()["scalars"]:
        out["mlflow"][name] = [(m.step, m.value) for m in client.get_metric_history(run_id, name)]
    for row in wandb_history(run_dir):
        for name, value in row.items():
            if not name.startswith(("_", "trainer/")):
                out["wandb"].setdefault(name, []).append((row["trainer/step"], value))
    return out


TIMED = ("train/samples_per_s",)  # wall-clock figures: a replayed record has new ones


def assert_each_point_once(run_dir, extra_ok=lambda name, step: False, timed_as_sent=False):
    """Every tracker holds each (name, step) of metrics.jsonl once, with its value, and nothing else but what
    extra_ok allows. timed_as_sent: MLflow and W&B keep the first value sent of a wall-clock figure."""
    want = expected(run_dir)
    for tracker, held in tracker_points(run_dir).items():
        for name, values in want.items():
            steps = [step for step, _ in held.get(name, [])]
            assert len(steps) == len(set(steps)), (tracker, name, steps)  # no step twice
            got = dict(held.get(name, []))
            assert set(values) <= set(got), (tracker, name)
            if not (timed_as_sent and tracker != "tensorboard" and name in TIMED):
                assert {s: got[s] for s in values} == pytest.approx(values, rel=1e-6), (tracker, name)
            assert all(extra_ok(name, s) for s in set(got) - set(values)), (tracker, name, sorted(got))
        assert set(held) <= set(want) | {n for n in held if all(extra_ok(n, s) for s, _ in held[n])}, tracker


def test_resume_continues_each_tracker_without_duplicated_steps(tmp_path):
    """Two resumes of one run folder: continued from 1 to 2 epochs, then (as if killed after the epoch-1
    checkpoint, with everything later already sent) continued from that checkpoint again."""
    run_dir = tmp_path / "run"
    train(compose_tiny(tmp_path, LOGGERS, "trainer.epochs=1"), run_dir=run_dir)
    epoch1 = tmp_path / "epoch1.pt"
    shutil.copy(run_dir / "checkpoints" / "last.pt", epoch1)
    first_test_step = max(step for step, _ in tracker_points(run_dir)["mlflow"]["test/best/img/accuracy"])

    train(compose_tiny(tmp_path, f"resume={run_dir}"), run_dir=None, overrides=["trainer.epochs=2"])
    assert len(expected(run_dir)["val/img/accuracy"]) == 2
    # the trackers keep the test figures of the 1-epoch run (metrics.jsonl, cut back to the checkpoint, does not)
    earlier_test = lambda name, step: name.startswith("test/") and step == first_test_step  # noqa: E731
    assert_each_point_once(run_dir, earlier_test)
    before = tracker_points(run_dir)

    shutil.copy(epoch1, run_dir / "checkpoints" / "last.pt")
    train(compose_tiny(tmp_path, f"resume={run_dir}"), run_dir=None, overrides=["trainer.epochs=2"])
    assert_each_point_once(run_dir, earlier_test, timed_as_sent=True)
    after = tracker_points(run_dir)
    for tracker in ("mlflow", "wandb"):  # the replayed records were all held already: nothing sent again
        assert after[tracker] == before[tracker], tracker
    with (run_dir / "metrics.csv").open(newline="") as handle:
        csv_records = sorted({int(row["record"]) for row in csv.DictReader(handle)})
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert csv_records == [i for i, line in enumerate(lines) if scalars(json.loads(line))]
    # one W&B run id throughout (a folder started in the same second as another gets a -1 suffix: read the file name)
    wandb_ids = {p.stem.removeprefix("run-") for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")}
    assert wandb_ids == {(run_dir / "wandb-run-id").read_text().strip()}
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mtmm").experiment_id
    assert len(client.search_runs([experiment])) == 1


@pytest.mark.parametrize("name, module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_missing_tracker_package_names_the_extra(monkeypatch, name, module):
    from mtmm.errors import UserError
    from mtmm.loggers import check_trackers
    monkeypatch.setitem(__import__("sys").modules, module, None)  # import fails as if not installed
    with initialize_config_module("mtmm.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"logger={name}"])
    with pytest.raises(UserError, match=rf'logger={name} needs the {module} package: pip install "mtmm\[{name}\]"'):
        check_trackers(cfg.logger)


def test_no_tracker_by_default_metrics_jsonl_only():
    from mtmm.loggers import build_trackers
    with initialize_config_module("mtmm.conf", version_base="1.3"):
        cfg = compose("train")
    assert cfg.get("logger") is None and build_trackers(cfg.get("logger"), None, {}, None) == []


def test_a_resumed_run_does_not_take_remote_trackers_from_the_stored_config(tmp_path):
    """resume= reads the config from the checkpoint: it may not send records to a server or log in to W&B unless
    the command line says so again."""
    from mtmm.resume import resumed_config
    run_dir = tmp_path / "run"
    train(compose_tiny(tmp_path, "logger=[mlflow,wandb]", "trainer.epochs=1"), run_dir=run_dir)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    stored = state["config"].replace("tracking_uri: null", "tracking_uri: http://tracker.example:5000")
    stored = stored.replace("mode: offline", "mode: online")
    state["config"] = stored
    torch.save(state, run_dir / "checkpoints" / "last.pt")
    composed = compose_tiny(tmp_path)
    cfg = resumed_config(composed, run_dir, run_dir / "checkpoints" / "last.pt", [])
    assert cfg.logger.mlflow.tracking_uri is None and cfg.logger.wandb.mode == "offline"
    again = ["logger=[mlflow,wandb]", "logger.wandb.mode=online", "logger.mlflow.tracking_uri=http://mine:5000"]
    cfg = resumed_config(compose_tiny(tmp_path, *again), run_dir, run_dir / "checkpoints" / "last.pt", again)
    assert cfg.logger.wandb.mode == "online" and cfg.logger.mlflow.tracking_uri == "http://mine:5000"
