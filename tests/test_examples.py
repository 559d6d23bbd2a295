"""The scripts in examples/ run as the docs say (README, docs/index.md, docs/distributed.md), with
small arguments: each in its own process, as a user runs it."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*argv: str, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quickstart():
    out = run("examples/quickstart.py")
    assert "weights 90.0%" in out and "finalized: ResNet" in out


def test_torchvision_finetune(tmp_path):
    out = run("examples/torchvision_finetune.py", "--epochs", "1", "--out", str(tmp_path))
    assert "finalized model saved to" in out and (tmp_path / "final.pt").stat().st_size > 0


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_distributed_under_torchrun(wrap):
    out = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "examples/distributed.py",
              "--wrap", wrap, "--steps", "4")
    assert f"{wrap}, 2 processes: weight sparsity 0.900" in out
