"""Spatial sampling (METHODS §1): s distinct positions per image, or every position once on a map
with fewer than s positions, with N recorded per layer (capture and layers.csv)."""

from __future__ import annotations

import shutil

import pandas as pd
import torch
import torch.nn as nn

from axes_pipeline.capture import capture_activations, load_capture, save_capture
from axes_pipeline.capture.activations import _sample_positions
from axes_pipeline.models import conv_norm_pairs

from .helpers import make_cfg


def test_positions_distinct_or_every_one_once():
    gen = torch.Generator().manual_seed(0)
    pos = _sample_positions(5, 64, 16, gen)
    assert pos.shape == (5, 16) and all(len(set(row.tolist())) == 16 for row in pos)
    small = _sample_positions(5, 4, 16, gen)           # a 2x2 map at s=16: each position once
    assert small.shape == (5, 4) and all(sorted(row.tolist()) == [0, 1, 2, 3] for row in small)
    assert _sample_positions(3, 16, 16, gen).sort(dim=1).values.tolist() == [list(range(16))] * 3


class BigThenSmall(nn.Module):
    """conv1 on 8x8 (64 positions), conv2 after a 4x4 pool on 2x2 (4 positions)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(4)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def test_small_map_rows_are_the_whole_map_and_n_is_recorded(tmp_path):
    torch.manual_seed(0)
    model = BigThenSmall().eval()
    units = conv_norm_pairs(model)
    x, y = torch.randn(12, 3, 8, 8), torch.randint(0, 3, (12,))
    loader = [(x[:5], y[:5]), (x[5:], y[5:])]
    cap = capture_activations(model, units, loader, samples_per_image=16, patch_moments=True, progress=False, keep_samples=True,
                              stream_moments=True)   # moments too: the cache holds them
    assert cap.per_image == {"conv1": 16, "conv2": 4}
    assert cap.n_samples("conv1") == 12 * 16 and cap.n_samples("conv2") == 12 * 4
    # conv2's rows: every position of every image once, no duplicate row
    with torch.no_grad():
        full = model.conv2(model.pool(torch.relu(model.bn1(model.conv1(x)))))       # [12, 5, 2, 2]
    expected = full.flatten(2).permute(0, 2, 1).reshape(-1, 5)
    assert torch.allclose(cap.acts["conv2"], expected, atol=1e-6)
    # each layer's rows pair with their own image's T
    assert cap.target_of("conv1") is cap.target and len(cap.target) == 12 * 16
    t_img = cap.target[::16]
    assert torch.equal(cap.target_of("conv2"), t_img.repeat_interleave(4))
    assert torch.equal(cap.image_index_of("conv2"), torch.arange(12).repeat_interleave(4))
    assert cap.patches["conv2"].n == 12 * 4 and cap.patches["conv1"].n == 12 * 16
    # a replaced target (dynamics.target=final) is followed per layer too
    cap.target = -cap.target
    assert torch.equal(cap.target_of("conv2"), -t_img.repeat_interleave(4))
    save_capture(cap, tmp_path / "c.pt")
    assert load_capture(tmp_path / "c.pt").per_image == cap.per_image


def test_layers_csv_carries_n_samples(tiny_run, tmp_path):
    # digits 16x16 through the CIFAR-stem ResNet-18: layer4 runs at 2x2, fewer than s=8 positions
    from axes_pipeline.analyses.analyze import run_analysis

    root, overrides = tiny_run
    mine = tmp_path / "root"
    shutil.copytree(root, mine, ignore=shutil.ignore_patterns("analyze"))
    cfg = make_cfg("analyze", [*overrides, "capture.n_cal=100", "capture.samples_per_image=8",
                               "capture.layers=[conv1,layer4.0.conv1]", "gradients.enabled=false",
                               "graphs.null_shuffles=1", "device=cpu", "plots=false"], mine)
    run_analysis(cfg)
    layers = pd.read_csv(next(mine.rglob("analyze/layers.csv"))).set_index("layer")
    assert layers.loc["conv1", "n_samples"] == 100 * 8
    assert layers.loc["layer4.0.conv1", "n_samples"] == 100 * 4
    axes = pd.read_csv(next(mine.rglob("analyze/axes.csv")))
    assert axes.loc[axes.layer == "layer4.0.conv1", "task_info"].notna().all()


def test_gap_is_one_sample_per_image():
    model = BigThenSmall().eval()
    batch = [(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))]
    cap = capture_activations(model, conv_norm_pairs(model), batch, spatial="gap", progress=False, keep_samples=True)
    assert cap.per_image == {"conv1": 1, "conv2": 1} and cap.n_samples("conv2") == 4


def test_capture_keeps_no_samples_unless_asked():
    import torch

    from axes_pipeline.capture import capture_activations
    from axes_pipeline.models import conv_norm_pairs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    units = conv_norm_pairs(model)
    data = [(torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,)))]
    lean = capture_activations(model, units, data, samples_per_image=2, progress=False)
    assert lean.acts == {} and lean.target is None and set(lean.moments) == set(units)
    full = capture_activations(model, units, data, samples_per_image=2, progress=False, keep_samples=True)
    assert torch.allclose(full.cov(next(iter(units))), lean.cov(next(iter(units))), atol=1e-6)
