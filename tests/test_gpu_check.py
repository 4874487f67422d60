"""scripts/gpu_check.py: its CPU dry run lists every check and passes; without CUDA (and the flag) it refuses."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
CHECKS = ["fp32", "eval", "bf16", "fp16", "ddp", "compile", "workers_pinned", "feature_cache", "bench_a", "bench_c",
          "large_model"]


def test_dry_run_lists_every_check_and_passes(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry-run", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split()[0]: line.split()[1] for line in done.stdout.splitlines()
            if line.split() and line.split()[0] in CHECKS}
    assert list(rows) == CHECKS
    assert set(rows.values()) <= {"PASS", "SKIP"} and rows["fp32"] == rows["eval"] == "PASS"
    assert (tmp_path / "out" / "results.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_exits_2_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--cpu-dry-run" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
