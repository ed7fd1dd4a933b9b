"""benchmarks/gpu_check.sh, dry run on a machine without a GPU: it must skip the GPU steps
cleanly, call python3 only, download nothing, and still write its summary (at most 8 files)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: gpu_check.sh would run for real")
@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_dry_run(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("python", "pip", "wget", "curl"):  # must never be called
        (fake / tool).write_text(f"#!/bin/sh\necho called >> {tmp_path}/{tool}.called\nexit 99\n")
        (fake / tool).chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(out), "GPU_CHECK_BUDGET": "120"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert "summary.txt" in files and "logs.tar.gz" in files and len(files) <= 8, files
    summary = (out / "summary.txt").read_text()
    for step in ("build", "tests", "bench"):
        assert f"{step}" in summary and "no CUDA device" in summary, summary
    assert not list(tmp_path.glob("*.called")), "gpu_check.sh called python, pip, wget or curl"
