"""Preemption and resumption: SIGKILL at any moment + resume = the uninterrupted run, bitwise; SIGTERM
checkpoints and stops; saves are atomic; the non-finite guard; distributed training on CPU."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtmm.checkpoint import link_atomically, save_checkpoint
from mtmm.errors import UserError
from mtmm.train import train
from tests.conftest import assert_processes_agree

BIN = Path(sys.executable).parent
RUN = ["data.source.train=96", "data.source.val=32", "data.source.test=32", "data.batch_size=16", "trainer.epochs=2",
       "trainer.checkpoint_every=1", "trainer.progress=false", "device=cpu", "encoder.text.hidden_size=32",
       "encoder.text.intermediate_size=64", "modality_dropout.text=0.3"]  # dropout: the RNG state must be restored too


def start(run_dir: Path, cache: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "MTMM_CACHE": str(cache)}
    # Its own process group, as a terminal's foreground job has: a signal to the group reaches loader workers too.
    return subprocess.Popen([str(BIN / "mtmm-train"), *RUN, f"hydra.run.dir={run_dir}", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        records = run_dir / "metrics.jsonl"
        if records.exists() and any(json.loads(line).get("step", 0) and json.loads(line)["step"] >= step
                                    for line in records.read_text().splitlines() if line.strip().endswith("}")):
            return
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return output


def final_state(run_dir: Path) -> tuple[dict, dict]:
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return state["model"], json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    folder = tmp_path_factory.mktemp("reference")
    cache = tmp_path_factory.mktemp("cache")
    finish(start(folder / "run", cache))
    return folder / "run", cache


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    model, summary = final_state(run_dir)
    expected_model, expected_summary = final_state(reference_dir)
    assert model.keys() == expected_model.keys()
    for key in model:
        assert torch.equal(model[key], expected_model[key]), key
    for part in ("best", "final"):
        assert summary[part] == expected_summary[part]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference_dir / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rs]  # noqa: E731 - timing
    assert strip(records) == strip(expected)  # appended, with nothing doubled or lost


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_step", [2, 7])
def test_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path, reference, kill_after_step):
    reference_dir, cache = reference
    run_dir = tmp_path / "run"
    process = start(run_dir, cache)
    wait_for_step(run_dir, kill_after_step, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finish(subprocess.Popen([str(BIN / "mtmm-train"), f"resume={run_dir}"], env={**os.environ, "MTMM_CACHE": str(cache)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    assert_same_run(run_dir, reference_dir)
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()  # the original run's Hydra record is kept
    assert list((run_dir / ".hydra").glob("resumed-*"))


# mtmm-train itself, killed with SIGKILL at one chosen moment: `when(state)` is true for the checkpoint save (a state
# dict) at which the process dies, after torch.save wrote the temp file and before it is renamed into place.
KILLED_AT = """
import os, signal, sys
import mtmm.checkpoint, mtmm.train
real = mtmm.checkpoint.torch.save
def save(obj, file):
    real(obj, file)
    if isinstance(obj, dict) and obj.get("format") and ({when}):
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
mtmm.checkpoint.torch.save = save
sys.argv = ["mtmm-train", *sys.argv[1:]]
mtmm.train.main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("when", [
    'obj["step"] == 1',  # the first checkpoint write: no last.pt exists yet
    'obj["progress"]["batch"] == 0 and obj["progress"]["epoch"] == 2',  # epoch 1's val record is written, not saved
], ids=["during-the-first-checkpoint-write", "between-the-validation-record-and-its-checkpoint"])
def test_sigkill_at_the_worst_moments_then_resume_equals_the_uninterrupted_run(tmp_path, reference, when):
    reference_dir, cache = reference
    run_dir = tmp_path / "run"
    env = {**os.environ, "MTMM_CACHE": str(cache)}
    killed = subprocess.run([sys.executable, "-c", KILLED_AT.format(when=when), *RUN, f"hydra.run.dir={run_dir}"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert list((run_dir / "checkpoints").glob(".*.tmp"))  # the interrupted write's temp file
    again = subprocess.run([str(BIN / "mtmm-train"), *RUN, f"hydra.run.dir={run_dir}"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2 and "already holds a run" in again.stdout + again.stderr  # not overwritten
    finish(subprocess.Popen([str(BIN / "mtmm-train"), f"resume={run_dir}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True))
    assert_same_run(run_dir, reference_dir)
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("sig, extra", [(signal.SIGTERM, []), (signal.SIGINT, ["data.num_workers=1"])],
                         ids=["sigterm", "ctrl-c-with-a-loader-worker"])
def test_a_stop_signal_checkpoints_stops_and_tells_how_to_resume(tmp_path, reference, sig, extra):
    reference_dir, cache = reference
    run_dir = tmp_path / "run"
    process = start(run_dir, cache, *extra)
    wait_for_step(run_dir, 3, process)
    os.killpg(process.pid, sig)  # to every process of the run, as a terminal's Ctrl-C or a scheduler sends it
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2, output
    assert f"stopped by {sig.name}" in output and f"mtmm-train resume={run_dir}" in output
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"]["step"] >= 3 and not (run_dir / "summary.json").exists()
    finish(subprocess.Popen([str(BIN / "mtmm-train"), f"resume={run_dir}"], env={**os.environ, "MTMM_CACHE": str(cache)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    assert_same_run(run_dir, reference_dir)


def test_a_failing_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)
    before = path.read_bytes()

    def broken_save(obj, file):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_best_and_last_of_the_same_step_are_one_file_written_once(make_cfg, tmp_path, monkeypatch):
    saves = []
    original = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, file: saves.append(obj.get("step")) or original(obj, file))
    train(make_cfg("trainer.epochs=1"), tmp_path)  # a first epoch always improves: best.pt, then last.pt
    best, last = tmp_path / "checkpoints" / "best.pt", tmp_path / "checkpoints" / "last.pt"
    assert saves == [3] and os.path.samefile(best, last)
    assert torch.load(last, weights_only=True)["step"] == 3


def test_a_later_save_of_one_name_leaves_its_twin_as_it_was(tmp_path, monkeypatch):
    best, last = tmp_path / "best.pt", tmp_path / "last.pt"
    save_checkpoint({"step": 1}, best)
    link_atomically(best, last)
    assert os.path.samefile(best, last)
    save_checkpoint({"step": 2}, last)
    assert torch.load(best, weights_only=True)["step"] == 1 and torch.load(last, weights_only=True)["step"] == 2
    # A file system without hard links: a copy, written atomically.
    monkeypatch.setattr(os, "link", lambda *args: (_ for _ in ()).throw(OSError("not supported")))
    link_atomically(best, last)
    assert not os.path.samefile(best, last) and last.read_bytes() == best.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temp file left


def nan_at_step(monkeypatch, bad_step: int):
    import mtmm.loop
    real, calls = mtmm.loop.masked_task_loss, {"n": 0}

    def loss(task_type, logits, targets, mask):
        value = real(task_type, logits, targets, mask)
        if not logits.requires_grad:  # validation and test scoring
            return value
        calls["n"] += 1
        return value * float("nan") if calls["n"] == 2 * bad_step - 1 else value  # the first task of that step

    monkeypatch.setattr(mtmm.loop, "masked_task_loss", loss)


def test_nonfinite_loss_stops_naming_step_and_task_keeping_the_checkpoint(make_cfg, tmp_path, monkeypatch):
    nan_at_step(monkeypatch, 5)
    with pytest.raises(UserError, match=r"the loss of task 'img' is nan at step 5 \(epoch 2\)"):
        train(make_cfg(), run_dir=tmp_path)
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == 3  # epoch 1's


def test_nonfinite_loss_skipped_and_counted(make_cfg, tmp_path, monkeypatch):
    nan_at_step(monkeypatch, 5)
    train(make_cfg("trainer.on_nonfinite=skip"), run_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped_nonfinite_batches"] == 1
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == 5  # 6 batches, 1 skipped


@pytest.mark.slow
def test_two_processes_on_cpu_match_one_with_the_same_global_batch(make_cfg, tmp_path):
    # No BatchNorm (text only) and no dropout, so 1 and 2 processes compute the same function of the same samples.
    common = ["tasks=txt", "encoder/image=none", "encoder.text.dropout=0", "mtl.dropout=0", "data.batch_size=32",
              "encoder.text.hidden_size=32", "encoder.text.intermediate_size=64"]
    train(make_cfg(*common), run_dir=tmp_path / "one")
    train(make_cfg(*common, "device.nproc_per_node=2"), run_dir=tmp_path / "two")
    assert_processes_agree(tmp_path / "one", tmp_path / "two", "txt")
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["samples"]["train"] == 96
