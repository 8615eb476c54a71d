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
    assert report["analyze_all"]["wall_s"] > 0 and report["report"]["wall_s"] > 0
    assert report["prediction"]["total_gpu_hours"] > 0 and "GPU-hours" in report["prediction"]["table"]
    assert report["prediction"]["table"] in res.stdout           # the one printed table


def _gpu_check():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


def test_headline_suite_is_read_from_the_configs():
    gc = _gpu_check()
    from axes_pipeline.pruning.scores import DEFAULT_SCORES

    runs = {r.experiment: r for r in gc.headline_suite()}
    assert set(runs) == {"cifar100_resnet18", "cifar100_vgg16", "cifar100_mobilenetv2"}
    points = (len(DEFAULT_SCORES) + 3 - 1) * 9          # random: 3 draws; 9 FLOPs targets (METHODS §9)
    for r in runs.values():                              # METHODS §10: 100 epochs, 5 seeds, val 10% of 50,000
        assert (r.seeds, r.epochs, r.train_images, r.prune_points) == (5, 100, 45_000, points)
        assert r.eval_images == 100 * 5_000 + 10_000
    assert runs["cifar100_vgg16"].knobs["head"] == "imagenet" and runs["cifar100_mobilenetv2"].knobs["cifar_strides"] is False


def test_prediction_arithmetic():
    gc = _gpu_check()
    runs = [gc.SuiteRun("a", "m1", {}, seeds=5, epochs=10, train_images=900, eval_images=300, prune_points=4),
            gc.SuiteRun("b", "m2", {}, seeds=2, epochs=1, train_images=100, eval_images=30, prune_points=1)]
    pred = gc.predict_suite(runs, train_images_per_s=100.0, speed={"m1": 1.0, "m2": 0.5}, analyze_s=60.0,
                            prune_fixed_s=20.0, prune_point_s=10.0, report_s_per_run=3.0, target_gpu_hours=0.1)
    a, b = pred["rows"]
    # a: 10·900/100 = 90 s training + 300/3/100 = 1 s evaluation; analyze 60; prune 20 + 4·10 = 60
    assert (a["train_s"], a["analyze_s"], a["prune_s"], a["total_s"]) == pytest.approx((91, 60, 60, 5 * 211))
    # b at half the speed: (100 + 10)/50 = 2.2 s; 120; (20 + 10)·2 = 60
    assert (b["train_s"], b["analyze_s"], b["prune_s"], b["total_s"]) == pytest.approx((2.2, 120, 60, 2 * 182.2))
    assert pred["report_s"] == pytest.approx(3.0 * 7)
    assert pred["total_gpu_hours"] == pytest.approx((5 * 211 + 2 * 182.2 + 21) / 3600)
    assert pred["within_target"] is False        # 0.40 h > 0.1 h
    table = gc.prediction_table(pred).splitlines()
    assert len(table) == 1 + 2 + 2 and "OVER" in table[-1] and f"{pred['total_gpu_hours']:.2f}" in table[-1]


def test_prediction_table_from_tiny_cpu_throughputs():
    """The prediction as gpu_check makes it, on throughputs measured here of the three narrow backbones
    (the other stages' times as a tiny CPU check measured them)."""
    gc = _gpu_check()
    measured = {"train": {"on_device": {"images_per_s": 300.0}}, "analyze_all": {"wall_s": 40.0},
                "prune": {"wall_s": 30.0, "points": 3, "point_s": 2.0}, "report": {"wall_s": 5.0}}
    pred = gc.headline_prediction(measured, "cpu", width=0.125, tiny=True)
    assert pred["measured"]["speed"]["resnet18"] == 1.0 and all(v > 0 for v in pred["measured"]["speed"].values())
    assert pred["measured"]["prune_fixed_s"] == 24.0
    lines = pred["table"].splitlines()
    assert [ln.split()[0] for ln in lines[1:4]] == ["cifar100_resnet18", "cifar100_vgg16", "cifar100_mobilenetv2"]
    assert "target 3 GPU-hours" in lines[-1] and pred["total_gpu_hours"] > 0
    json.dumps(pred)                               # goes into gpu_check.json as it is


def test_protocols_prediction_arithmetic():
    gc = _gpu_check()
    runs = [gc.SuiteRun("a", "m1", {}, seeds=5, epochs=10, train_images=900, eval_images=300, prune_points=4)]
    pred = gc.predict_suite(runs, train_images_per_s=100.0, speed={"m1": 0.5}, analyze_s=60.0,
                            prune_fixed_s=20.0, prune_point_s=10.0, report_s_per_run=3.0)
    got = gc.predict_protocols(runs, pred, prune_point_s=10.0, speed={"m1": 0.5})
    # iterative: 4 points · 10 s · the measured cost ratio / 0.5; scratch: 3 scores · (0.7 + 0.5 + 0.3) · 182 s
    row = got["rows"][0]
    assert row["iterative_s"] == pytest.approx(4 * 10 * gc.ITERATIVE_POINT_COST / 0.5)
    assert row["scratch_s"] == pytest.approx(3 * 1.5 * pred["rows"][0]["train_s"]) and pred["rows"][0]["train_s"] == 182
    assert got["scratch_gpu_hours"] == pytest.approx(5 * row["scratch_s"] / 3600)
    assert gc.protocols_table(got).splitlines()[-1].split()[:2] == ["in", "all"]
