"""`make gpu-check`: polite refusal without CUDA, and its stages run on CPU at tiny sizes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from .helpers import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_gpu_check_refuses_without_cuda(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA GPU"), res.stderr
    assert res.stdout == "" and not any(tmp_path.iterdir())       # nothing done, nothing written


def test_synthetic_throughput_runs_on_cpu():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from gpu_check import synthetic_throughput
    finally:
        sys.path.pop(0)
    assert synthetic_throughput("cpu", width=0.125, batch=8, steps=2) > 0


@pytest.mark.slow   # train ×2, axes, analyze all, prune through the entry points: 60–150 s on 2 cores
def test_gpu_check_stages_run_on_cpu_tiny(tmp_path):
    """The same functions and entry points as on the GPU (device=cpu, no torch.compile)."""
    out = tmp_path / "out.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu-tiny", "--out",
                          str(tmp_path / "run"), "--json", str(out)], capture_output=True, text=True, timeout=1500,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["train"]) == {"on_device", "dataloader"}
    assert all(r["images_per_s"] > 0 for r in report["train"].values())
    assert report["axes"]["ratio_to_floor"] > 0 and report["axes"]["cache_mb"] > 0
    assert report["prune"]["points"] == 3 and report["prune"]["ratio_to_floor"] >= 1.0
    assert report["analyze_all"]["wall_s"] > 0
