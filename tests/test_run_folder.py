"""Runs never lose, mix or overwrite a user's files: one process per run folder, no writing into folders mtmm did not
make, resume only inside a run folder and with overrides it can honour, a full disk in one line, a stop signal
during the final test honoured."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mtmm.train
from mtmm.checkpoint import save_checkpoint
from mtmm.errors import UserError
from mtmm.records import MetricsLog
from mtmm.run_folder import MARKER, claim, release
from mtmm.train import train

BIN = Path(sys.executable).parent
FAST = ["tasks=txt", "encoder/image=none", "encoder.text.hidden_size=16", "encoder.text.intermediate_size=32"]


def hold_in_another_process(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from mtmm.run_folder import claim; "
                               f"claim({str(folder)!r}); print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_process_in_a_folder_in_use_stops_at_once(make_cfg, tmp_path):
    folder = tmp_path / "run"
    holder = hold_in_another_process(folder)
    try:
        with pytest.raises(UserError, match=rf"{folder} is in use by another mtmm process \(.*\"pid\": {holder.pid}"):
            train(make_cfg(*FAST), run_dir=folder)
        started = time.time()
        result = subprocess.run([str(BIN / "mtmm-train"), f"hydra.run.dir={folder}", *FAST], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2 and "is in use by another mtmm process" in result.stderr + result.stdout
        assert time.time() - started < 60
        assert sorted(path.name for path in folder.iterdir()) == [MARKER]  # no train.log, .hydra or records
    finally:
        holder.communicate("")
    claim(folder)  # the lock goes with the process that held it
    release(folder)


def test_a_folder_holding_files_mtmm_did_not_write_is_never_written_into(make_cfg, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("my own notes\n")
    (folder / "metrics.jsonl").write_text('{"mine": 1}\n')
    with pytest.raises(UserError, match=rf"{folder} holds files mtmm did not write \(config.yaml, metrics.jsonl\)"):
        train(make_cfg(*FAST), run_dir=folder)
    result = subprocess.run([str(BIN / "mtmm-train"), f"hydra.run.dir={folder}", *FAST], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "holds files mtmm did not write" in result.stderr + result.stdout
    assert sorted(path.name for path in folder.iterdir()) == ["config.yaml", "metrics.jsonl"]
    assert (folder / "config.yaml").read_text() == "my own notes\n"
    evaluated = subprocess.run([str(BIN / "mtmm-eval"), "checkpoint=x.pt", f"hydra.run.dir={folder}"],
                               capture_output=True, text=True, timeout=120)
    assert evaluated.returncode == 2 and sorted(path.name for path in folder.iterdir()) == ["config.yaml",
                                                                                            "metrics.jsonl"]


@pytest.fixture
def finished_run(make_cfg, tmp_path):
    folder = tmp_path / "run"
    train(make_cfg(*FAST), run_dir=folder)
    return folder


def test_resume_of_a_checkpoint_outside_a_run_folder_is_refused_and_writes_nothing(make_cfg, finished_run, tmp_path):
    downloads = tmp_path / "downloads" / "paper"
    downloads.mkdir(parents=True)
    (downloads / "model.pt").write_bytes((finished_run / "checkpoints" / "best.pt").read_bytes())
    (tmp_path / "downloads" / "metrics.jsonl").write_text('{"theirs": 1}\n')  # the file's grandparent
    before = {path: path.read_bytes() for path in (tmp_path / "downloads").rglob("*") if path.is_file()}
    with pytest.raises(UserError, match=r"not a checkpoint inside a run folder's checkpoints/.*mtmm-eval checkpoint="):
        train(make_cfg(*FAST, f"resume={downloads / 'model.pt'}"))
    assert {path: path.read_bytes() for path in (tmp_path / "downloads").rglob("*") if path.is_file()} == before


def test_resume_honours_more_epochs_and_refuses_other_changes(make_cfg, finished_run):
    for override in ("fusion=early", "optim.lr=0.5", "+extra=1", "tasks.txt.weight=2"):
        with pytest.raises(UserError, match=rf"resume: {re.escape(override)} would change what the run computes.*"
                                            r"trainer.epochs, trainer.progress"):
            train(make_cfg(*FAST, f"resume={finished_run}", override), overrides=[f"resume={finished_run}", override])
    with pytest.raises(UserError, match="trainer.epochs=1, but the run has done 2 epochs"):
        train(make_cfg(*FAST, f"resume={finished_run}", "trainer.epochs=1"),
              overrides=[f"resume={finished_run}", "trainer.epochs=1"])
    train(make_cfg(*FAST, f"resume={finished_run}", "trainer.epochs=3"),
          overrides=[f"resume={finished_run}", "trainer.epochs=3"])
    records = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["split"] == "val"] == [1, 2, 3]
    assert torch.load(finished_run / "checkpoints" / "last.pt", weights_only=True)["progress"]["epoch"] == 4
    assert "epochs: 3" in (finished_run / "config.yaml").read_text()


def test_a_kill_leftover_temp_file_is_removed_at_the_next_start(make_cfg, finished_run):
    leftover = finished_run / "checkpoints" / ".last.pt.k2j4x9.tmp"
    leftover.write_bytes(b"half a checkpoint")
    user_file = finished_run / "checkpoints" / "notes.tmp"  # not a name mtmm's writes use
    user_file.write_text("kept")
    train(make_cfg(*FAST, f"resume={finished_run}"), overrides=[])
    assert not leftover.exists() and user_file.read_text() == "kept"


def test_sigterm_during_the_final_test_stops_gracefully_and_resume_finishes(make_cfg, tmp_path, monkeypatch):
    real, calls = mtmm.train.evaluate, []

    def evaluate_after_a_signal(*args, **kwargs):
        calls.append(1)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during the test evaluation
        return real(*args, **kwargs)

    monkeypatch.setattr(mtmm.train, "evaluate", evaluate_after_a_signal)
    folder = tmp_path / "run"
    with pytest.raises(UserError, match=rf"stopped by SIGTERM .* Resume with: mtmm-train resume={folder}"):
        train(make_cfg(*FAST), run_dir=folder)
    assert calls == [1] and not (folder / "summary.json").exists()
    monkeypatch.setattr(mtmm.train, "evaluate", real)
    train(make_cfg(*FAST, f"resume={folder}"), overrides=[])
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("checkpoint") for r in records if r["split"] == "test"] == ["last", "best"]
    assert json.loads((folder / "summary.json").read_text())["final"]["test"]["txt"]["count"] == 32


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"step": 1}, path)
    before = path.read_bytes()

    def full_disk(obj, file):
        file.write(b"the first bytes of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match=rf"cannot write {path}: the disk is full \(.* MiB free there\); the previous "
                                        r"last.pt is intact"):
        save_checkpoint({"step": 2}, path)
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_a_full_disk_while_appending_a_record_is_one_line(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write(step=1)

    def full(text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(log.file, "write", full)
    with pytest.raises(UserError, match=rf"cannot append to {tmp_path / 'metrics.jsonl'}: the disk is full"):
        log.write(step=2)
    assert log.lines == 1
