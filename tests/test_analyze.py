"""analyze.py end to end on a tiny digits run, the capture stage, and bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from axes_pipeline.analyses.analyze import run_analysis
from axes_pipeline.capture import capture_activations, check_finite
from axes_pipeline.errors import UserError
from axes_pipeline.metrics import AXES_KEYS, channel_axes
from axes_pipeline.models import build_model, conv_norm_pairs
from axes_pipeline.runs import read_json

from .helpers import CONF, SMALL, make_cfg, run_entry


def _analyze(tiny_run, *extra):
    root, overrides = tiny_run
    cfg = make_cfg("analyze", [*overrides, *SMALL, *extra], root)
    return cfg, run_analysis(cfg)


def test_analyze_end_to_end(tiny_run):
    cfg, summary = _analyze(tiny_run)
    out = Path(cfg.paths.run_dir) / "analyze"
    axes = pd.read_csv(out / "axes.csv")
    layers = pd.read_csv(out / "layers.csv")
    for key in (*AXES_KEYS, "layer", "channel", "l1", "l2", "bn_scale", "grad_cos_euclid", "grad_cos_whitened",
                "community_r", "community_s"):
        assert key in axes.columns, key
    assert len(layers) == 20 and layers["channels"].sum() == len(axes)
    for col in ("align_input_capture_task_info", "align_peer_overlap_target_excess", "align_hull_score_task_unique",
                "q_r", "q_s", "modularity_gap", "nmi", "ari", "null_q_r", "null_modularity_gap", "hull_size_mean",
                "hull_saturated_frac", "s3_s2", "grad_cos_euclid_median", "grad_cos_whitened_median"):
        assert col in layers.columns, col
    assert not axes[list(AXES_KEYS)].isna().any().any()
    assert layers["grad_cos_whitened_median"].abs().max() < 1e-4      # the built-in correctness check
    # ... on gradients.check_layers = 6 depth-spaced layers (METHODS §5), first and last included, and
    # the narrowest layer of a patch geometry none of them has (ResNet-18's 1×1 stride-2 shortcut here)
    checked = layers.loc[layers["grad_cos_whitened_median"].notna(), "layer"].tolist()
    assert len(checked) == 7 and checked[0] == layers["layer"].iloc[0] and checked[-1] == layers["layer"].iloc[-1]
    assert "layer2.0.downsample.0" in checked
    assert layers["grad_cos_euclid_median"].notna().all()
    for png in ("scatter_ix_it", "depth_profile", "communities"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 1000
    saved = read_json(out / "analyze_summary.json")
    assert saved["axes"]["layers"] == 20 and "config" in saved
    assert summary["axes"]["mean_hull_size_mean"] == pytest.approx(layers["hull_size_mean"].mean())


def test_whitened_check_layers_are_depth_spaced_dense_layers():
    """gradients.check_layers: that many layers spaced over depth among those with patch moments
    (dense convs: MobileNetV2's depthwise ones have none); null = every one, 0 = none."""
    from axes_pipeline.axes.table import whitened_check_layers

    units = conv_norm_pairs(build_model("mobilenetv2", 10, width=0.25))
    dense = [n for n, u in units.items() if u.groups == 1]
    assert len(dense) < len(units)
    settings = {"gradients.check_layers": 6, "gradients.max_patch_dim": 4608, "gradients.check_max_dim": None}
    picked = whitened_check_layers(units, settings, "pre_bn")
    assert len(picked) == 6 and set(picked) <= set(dense) and (picked[0], picked[-1]) == (dense[0], dense[-1])
    assert picked == sorted(picked, key=dense.index)
    assert whitened_check_layers(units, {**settings, "gradients.check_layers": None}, "pre_bn") is None
    assert whitened_check_layers(units, {**settings, "gradients.check_layers": 0}, "pre_bn") == []


def test_whitened_check_layers_skip_wide_patches_but_cover_every_geometry():
    """gradients.check_max_dim: the depth-spaced layers are chosen among patches at most that wide
    (VGG-16's 4,608-wide last six convs are not checked at the default 2,304), and each patch
    geometry (kernel, stride, padding, dilation) is checked at its narrowest layer when none of the
    chosen ones has it (ResNet-18's 3×3 stride-2 convs, all wider than the cap here)."""
    from axes_pipeline.axes.table import whitened_check_layers
    from axes_pipeline.capture import patch_dim

    settings = {"gradients.check_layers": 6, "gradients.max_patch_dim": 4608, "gradients.check_max_dim": 2304}
    vgg = conv_norm_pairs(build_model("vgg16", 100))
    picked = whitened_check_layers(vgg, settings, "pre_bn")
    assert len(picked) == 6 and max(patch_dim(vgg[n]) for n in picked) == 2304
    assert picked[0] == next(iter(vgg)) and picked == sorted(picked, key=list(vgg).index)
    resnet = conv_norm_pairs(build_model("resnet18", 100))
    picked = whitened_check_layers(resnet, {**settings, "gradients.check_max_dim": 100}, "pre_bn")
    assert picked == ["conv1", "layer2.0.conv1", "layer2.0.downsample.0"]     # 27, 576 (3×3 stride 2), 64 wide


def test_metric_knobs_reuse_the_capture(tiny_run):
    cfg, _ = _analyze(tiny_run)
    cache = list((Path(cfg.paths.run_dir) / "analyze" / "cache").glob("capture-*.pt"))
    stamp = {p: p.stat().st_mtime_ns for p in cache}
    _analyze(tiny_run, "metrics.hull_order=greedy", "metrics.hull_max=4")
    after = list((Path(cfg.paths.run_dir) / "analyze" / "cache").glob("capture-*.pt"))
    assert {p: p.stat().st_mtime_ns for p in after} == stamp            # no new forward pass
    axes = pd.read_csv(Path(cfg.paths.run_dir) / "analyze" / "axes.csv")
    assert axes["hull_size"].max() <= 4


def test_other_analyses_reuse_matching_axes(tiny_run):
    """analysis=propagation alone reads the axes back when they were computed with these settings,
    and recomputes them when a metric knob changed."""
    cfg, _ = _analyze(tiny_run)
    path = Path(cfg.paths.run_dir) / "analyze" / "axes.csv"
    stamp = path.stat().st_mtime_ns
    _, summary = _analyze(tiny_run, "analysis=propagation", "analysis.propagation.null_draws=1")
    assert summary["axes"].get("reused") and path.stat().st_mtime_ns == stamp
    stored = read_json(path.parent / "analyze_summary.json")
    assert {"axes", "propagation"} <= set(stored["analyses"]) and "propagation" in stored   # merged, not replaced
    _, summary = _analyze(tiny_run, "analysis=propagation", "analysis.propagation.null_draws=1", "metrics.hull_max=5")
    assert not summary["axes"].get("reused") and path.stat().st_mtime_ns != stamp
    _analyze(tiny_run)   # back to the default axes (recomputed) for the other tests of this module
    stamp = path.stat().st_mtime_ns
    _, summary = _analyze(tiny_run)                          # the same command again: skipped
    assert summary["axes"].get("reused") and path.stat().st_mtime_ns == stamp
    _, summary = _analyze(tiny_run, "analysis.axes.recompute=true")
    assert not summary["axes"].get("reused") and path.stat().st_mtime_ns != stamp


def test_capture_is_seeded_and_matches_channel_axes():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=0.125).eval()
    units = {k: v for k, v in list(conv_norm_pairs(model).items())[:3]}
    data = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(2)]
    a = capture_activations(model, units, data, samples_per_image=5, seed=3, progress=False, keep_samples=True)
    b = capture_activations(model, units, data, samples_per_image=5, seed=3, progress=False, keep_samples=True)
    name = next(iter(units))
    assert a.acts[name].shape == (16 * 5, units[name].conv.out_channels)
    assert torch.equal(a.acts[name], b.acts[name]) and torch.equal(a.target, b.target)
    # pre-BN samples are values of the conv output at the sampled positions
    with torch.no_grad():
        full = units[name].conv(data[0][0])
    vals = set(np.round(full[0, 0].flatten().numpy(), 5))
    assert all(np.round(v, 5) in vals for v in a.acts[name][:5, 0].numpy())
    gap = capture_activations(model, units, data, spatial="gap", progress=False, keep_samples=True)
    assert gap.acts[name].shape[0] == 16
    out = channel_axes(a.acts[name].double(), a.target.double())
    assert set(AXES_KEYS) <= set(out)


def test_post_act_does_not_change_the_forward():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=0.125).eval()
    units = conv_norm_pairs(model)
    x = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))]
    with torch.no_grad():
        ref = model(x[0][0])
    cap = capture_activations(model, units, x, point="post_act", samples_per_image=3, progress=False, keep_samples=True)
    assert torch.allclose(cap.target, capture_activations(model, units, x, samples_per_image=3,
                                                          progress=False, keep_samples=True).target)
    with torch.no_grad():
        assert torch.equal(model(x[0][0]), ref)
    assert all((a >= 0).all() for a in cap.acts.values() if True)  # ReLU after every BN in ResNet


def test_nan_activations_name_the_layer():
    from axes_pipeline.capture import Capture

    cap = Capture(acts={"layer1.0.conv1": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])},
                  target=torch.zeros(2), image_index=torch.arange(2), knobs={})
    with pytest.raises(UserError, match="layer1.0.conv1"):
        check_finite(cap)


# ---- bad input ----

def test_analyze_before_training_names_the_train_command(tmp_path):
    cfg = make_cfg("analyze", ["logger=none", "model.width=0.5", "seed=7"], tmp_path)
    with pytest.raises(UserError, match=r"python train.py .*model.width=0.5 seed=7"):
        run_analysis(cfg)


def test_bad_calibration_and_layer_names(tiny_run):
    # (an n_cal above the training split now means the whole split: tests/test_entrypoints.py)
    with pytest.raises(UserError, match="capture.n_cal must be at least 3"):
        _analyze(tiny_run, "capture.n_cal=2")
    with pytest.raises(UserError, match="unknown layer 'nope'.*layer1.0.conv1"):
        _analyze(tiny_run, "capture.layers=[nope]")


def test_unknown_analysis_lists_them(tmp_path):
    res = run_entry("analyze.py", "analysis=nosuch", "logger=none", cwd=tmp_path)
    assert res.returncode != 0 and "nosuch" in res.stderr and "lesion" in res.stderr


def test_analyze_cli_one_line_error(tmp_path):
    res = run_entry("analyze.py", "logger=none", cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: no trained run")
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("padding, mode", [(1, "zeros"), ("same", "zeros"), ("valid", "zeros"), ((2, 0), "zeros"),
                                           (1, "reflect"), ((2, 1), "circular"), ("same", "replicate")])
def test_patches_reproduce_the_conv_output(padding, mode):
    """Patch · filter at sampled positions equals the conv's output there, for every padding form and
    mode (the gradient cosines are built from these patches)."""
    from axes_pipeline.capture.activations import _patches_at, patch_order

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, (3, 4), padding=padding, dilation=(1, 2), bias=False, padding_mode=mode)
    x = torch.randn(2, 3, 9, 10)
    y = conv(x)
    b = torch.tensor([0, 1, 1, 0])
    oh = torch.tensor([0, y.shape[2] - 1, 2, 1])
    ow = torch.tensor([0, y.shape[3] - 1, 1, 3])
    got = _patches_at(x, conv, b, oh, ow) @ conv.weight.flatten(1)[:, patch_order(conv)].T   # (kh, kw, Cin) order
    torch.testing.assert_close(got, y[b, :, oh, ow], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding, stride", [(1, 1), ("same", 1), ("valid", 1), ((2, 0), 2)])
def test_patch_blocks_are_the_patches_without_their_padding(padding, stride):
    """Streamed by kernel offset, each block holds exactly the rows where that offset falls inside
    the map, and the blocks put back together (zeros elsewhere) are the patches."""
    from axes_pipeline.capture.activations import _patch_blocks, _patches_at

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, (3, 4), padding=padding, stride=stride, dilation=(1, 2), bias=False)
    x = torch.randn(2, 3, 9, 10) + 5.0       # no input value is 0: a 0 in the patches is padding
    y = conv(x)
    b = torch.tensor([0, 1, 1, 0, 1])
    oh = torch.tensor([0, y.shape[2] - 1, 2, 1, 0])
    ow = torch.tensor([0, y.shape[3] - 1, 1, y.shape[3] - 1, min(2, y.shape[3] - 1)])
    dense = _patches_at(x, conv, b, oh, ow)
    blocks = _patch_blocks(x, conv, b, oh, ow)
    assert blocks.n == len(b) and blocks.width == dense.shape[1] and len(blocks.blocks) == 12
    rebuilt = torch.zeros_like(dense)
    for i, (rows, vals) in enumerate(blocks.blocks):
        rebuilt[rows, 3 * i:3 * i + 3] = vals
    torch.testing.assert_close(rebuilt, dense, rtol=0, atol=0)
    assert sum(len(r) for r, _ in blocks.blocks) * 3 == int((dense != 0).sum())    # no padding in a block


def test_analyses_are_registered_with_their_checks():
    """Each analysis module declares itself (@analysis); analyze.py imports them, nothing else lists them."""
    from axes_pipeline.analyses.analyze import ANALYSES, axes_analysis
    from axes_pipeline.analyses.definitions import check_definitions_analysis, run_definitions_analysis
    from axes_pipeline.analyses.dynamics import check_dynamics_analysis, run_dynamics_analysis
    from axes_pipeline.analyses.lesions import check_lesion_analysis, run_lesion_analysis
    from axes_pipeline.analyses.linear_study import run_linear_gaussian
    from axes_pipeline.analyses.propagation import check_propagation_analysis, run_propagation_analysis

    want = {"axes": (axes_analysis, None, True), "lesion": (run_lesion_analysis, check_lesion_analysis, True),
            "propagation": (run_propagation_analysis, check_propagation_analysis, True),
            "dynamics": (run_dynamics_analysis, check_dynamics_analysis, True),
            "definitions": (run_definitions_analysis, check_definitions_analysis, True),
            "linear_gaussian": (run_linear_gaussian, None, False)}
    assert {k: (a.run, a.check, a.needs_run) for k, a in ANALYSES.items()} == want
    analysis_options = {p.stem for p in Path(CONF, "analysis").glob("*.yaml")} - {"all"}
    assert analysis_options == set(ANALYSES)


def test_capture_knobs_are_read_from_their_schema():
    from dataclasses import fields, replace

    from axes_pipeline.analyses.dynamics import dynamics_settings
    from axes_pipeline.analyses.settings import DynamicsAnalysis
    from axes_pipeline.axes.settings import NOT_IN_IDENTITY, AxesKnobs, CaptureConfig
    from axes_pipeline.axes.table import capture_settings

    knobs = AxesKnobs()
    names = {f"capture.{f.name}" for f in fields(CaptureConfig) if f.name not in NOT_IN_IDENTITY}
    assert names <= set(capture_settings(knobs))
    # the dynamics key their parts on the same names (their own layers instead of capture.layers)
    assert names - {"capture.layers"} <= set(dynamics_settings(knobs, DynamicsAnalysis(), ["conv1"]))
    one = replace(knobs, capture=replace(knobs.capture, layers="conv1"))   # one name stays one name (it once
    assert capture_settings(one)["capture.layers"] == "conv1"               # became a list of its letters)


def test_axes_registers_like_every_analysis():
    from axes_pipeline.analyses.analyze import selected
    from axes_pipeline.analyses.registry import ANALYSES
    from axes_pipeline.analyses.settings import ANALYSIS_SCHEMAS
    from axes_pipeline.errors import UserError

    assert set(ANALYSES) == set(ANALYSIS_SCHEMAS)   # axes included: one entry per analysis option
    assert selected(["axes", "lesion"]) == ["axes", "lesion"]
    with pytest.raises(UserError, match="choose from: axes, "):
        selected(["axis"])
