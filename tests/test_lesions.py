"""Lesions and peer replacement (METHODS §8): the batched engine against the weight path, exact
restoration, recovery of a channel that is a linear combination of its peers, knob errors, and
``analysis=lesion`` end to end on the tiny digits run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from axes_pipeline.analyses.analyze import run_analysis
from axes_pipeline.analyses.lesion_engine import (
    LesionEngine,
    Lesions,
    evaluate,
    peer_regression,
    trace,
    zeroed,
)
from axes_pipeline.analyses.lesions import check_lesion_analysis, lesion_layer, recovery, select_channels
from axes_pipeline.analyses.settings import LesionAnalysis
from axes_pipeline.errors import UserError
from axes_pipeline.metrics import channel_axes
from axes_pipeline.models import build_model, conv_norm_pairs
from axes_pipeline.models.synthetic import with_bn_statistics
from axes_pipeline.models.taylor import taylor_scores
from axes_pipeline.runs import read_json
from axes_pipeline.stage import stage_inputs, typed

from .helpers import make_cfg
from .reference.lesions import weight_lesion_eval


def _batches(size: int, n: int = 24, b: int = 16) -> list:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[i:i + b], y[i:i + b]) for i in range(0, n, b)]


def test_lesion_restores_the_network_bit_for_bit():
    model = with_bn_statistics("resnet18", 0.125)
    units = conv_norm_pairs(model)
    unit = units["layer1.0.conv2"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _batches(16)[0][0]
    with torch.no_grad():
        y0 = model(x)
        with zeroed(unit, [0, 3]):
            assert unit.conv.weight[[0, 3]].abs().sum() == 0 and unit.norm.weight[[0, 3]].abs().sum() == 0
            assert unit.norm.bias[[0, 3]].abs().sum() == 0
            assert not torch.equal(model(x), y0)
        with pytest.raises(RuntimeError), zeroed(unit, 5):
            raise RuntimeError("restored on an exception too")
    LesionEngine(model, unit).evaluate(_batches(16), Lesions.zero([1, 2], unit.conv.out_channels))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not unit.norm._forward_hooks and not unit.conv._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(x), y0)


@pytest.mark.parametrize("name,size,layers", [
    ("resnet18", 16, ["conv1", "layer2.0.conv2", "layer3.0.downsample.0", "layer4.1.conv2"]),
    ("vgg16", 32, ["features.0", "features.20", "features.40"]),
    ("convnext_t", 32, ["features.0.0", "features.2.1", "features.5.1.block.0"]),  # LayerNorm / no norm
])
def test_batched_lesions_equal_the_weight_path(name, size, layers):
    model = with_bn_statistics(name, 0.125)
    units = conv_norm_pairs(model)
    batches = _batches(size)
    graph = trace(model)
    for layer in layers:
        unit = units[layer]
        c = unit.conv.out_channels
        chans = [0, c // 2, c - 1]
        ref = weight_lesion_eval(model, unit, chans, batches)
        for split in (True, False):
            engine = LesionEngine(model, unit, graph=graph, split=split, max_rows=40)  # several chunks
            assert engine.batched_prefix == split
            got = engine.evaluate(batches, Lesions.zero(chans, c))
            np.testing.assert_allclose(got.loss, ref.loss, rtol=0, atol=1e-5, err_msg=f"{layer} split={split}")
            assert np.array_equal(got.correct, ref.correct) and got.n == ref.n == 24


class _Tiny(nn.Module):
    """conv (6 filters) → BN → ReLU → global pool → linear; filter 5 = 2·filter 0 − filter 1."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            self.conv.weight[5] = 2 * self.conv.weight[0] - self.conv.weight[1]
            self.conv.bias[5] = 2 * self.conv.bias[0] - self.conv.bias[1]
            self.fc.weight[:, 5] *= 8.0  # make channel 5 matter

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


def test_replacement_of_an_exact_linear_combination_recovers_it():
    model = _Tiny()
    g = torch.Generator().manual_seed(4)
    cal = torch.randn(64, 3, 8, 8, generator=g)
    with torch.no_grad():  # BN statistics of the calibration data, then eval mode
        pre = model.conv(cal)
        model.bn.running_mean.copy_(pre.mean((0, 2, 3)))
        model.bn.running_var.copy_(pre.var((0, 2, 3)))
    model.eval()
    acts = pre.permute(0, 2, 3, 1).reshape(-1, 6)  # every position: [N, C] pre-BN samples
    target = torch.randn(len(acts), generator=g)
    x = torch.randn(48, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)  # labels the intact network gets right: lesions can only hurt
    batches = [(x[:24], y[:24]), (x[24:], y[24:])]
    unit = conv_norm_pairs(model)["conv"]
    axes = {k: v.numpy() for k, v in channel_axes(acts, target).items()}
    rows_axes = pd.DataFrame(axes).rename_axis("channel")
    base = evaluate(model, batches)
    rows, batched = lesion_layer(model, unit, acts, target, rows_axes, np.array([2, 5]), batches,
                                 replace=["hull", "all"], ridge=1e-3, device="cpu")
    assert batched
    r5 = rows.set_index("channel").loc[5]
    assert {"0", "1"} <= set(r5["hull_members"].split(";"))
    damage = r5["loss_lesion"] - base.loss[0]
    assert damage > 0.05
    for v in ("hull", "all"):
        rec = recovery(np.array([damage]), np.array([r5[f"loss_{v}"] - base.loss[0]]), 1e-4)[0]
        assert rec > 0.98, (v, rec)
        assert r5[f"fit_{'hull' if v == 'hull' else 'full'}_explained"] > 0.99
    # the replacement written by hand: BN of μ + coef·(Y − μ) at every position
    coef, off, _ = peer_regression(acts, [5], "all", 1e-3)
    with torch.no_grad():
        ypre = model.conv(x)
        ypre[:, 5] = off[0].float() + torch.einsum("c,bchw->bhw", coef[0].float(), ypre)
        manual = nn.functional.cross_entropy(model.fc(torch.flatten(model.pool(model.relu(model.bn(ypre))), 1)), y)
    assert abs(float(manual) - r5["loss_all"]) < 1e-5


def test_replaceability_spearman_is_within_layer():
    from axes_pipeline.analyses.lesions import replaceability_spearman

    rng = np.random.default_rng(0)
    frames = []
    for name, scale in (("a", 1.0), ("b", 100.0)):           # layers with very different damage scales
        hull = rng.random(20)
        frames.append(pd.DataFrame({"layer": name, "hull_score": hull, "peer_overlap": rng.random(20),
                                    "damage_loss": scale * (1.0 - hull) + rng.normal(0, 0.01 * scale, 20)}))
    live = pd.concat(frames, ignore_index=True)
    got = replaceability_spearman(live)
    assert got["expected_sign"] == -1 and got["hull_score"]["layers_negative"] == 2
    assert got["hull_score"]["mean"] < -0.9 and set(got["hull_score"]["per_layer"]) == {"a", "b"}
    assert abs(got["peer_overlap"]["mean"]) < 0.5                # unrelated column: no signal
    # pooled raw values would mix the layers' scales; within-layer it is exactly the per-layer ρ
    from axes_pipeline.stats import spearman
    assert got["hull_score"]["per_layer"]["b"] == pytest.approx(spearman(frames[1]["damage_loss"],
                                                                         frames[1]["hull_score"])[0])


def test_recovery_is_nan_without_damage():
    r = recovery(np.array([0.5, 0.0, -0.1, 1e-6]), np.array([0.1, 0.2, 0.0, 0.0]), 1e-4)
    assert r[0] == pytest.approx(0.8) and np.isnan(r[1:]).all()


def test_channel_sample_is_seeded_and_bounded():
    a = select_channels(64, 10, 0, "layer1.0.conv1")
    assert np.array_equal(a, select_channels(64, 10, 0, "layer1.0.conv1")) and len(set(a)) == 10
    assert not np.array_equal(a, select_channels(64, 10, 0, "layer1.0.conv2"))
    assert np.array_equal(select_channels(8, "all", 0, "x"), np.arange(8))
    # auto: METHODS' 64 per layer, every channel of a smaller layer
    assert np.array_equal(select_channels(16, "auto", 0, "x"), np.arange(16))
    assert len(select_channels(128, "auto", 0, "x")) == 64


def test_taylor_leaves_the_model_as_it_was():
    model = with_bn_statistics("resnet18", 0.125)
    conv = conv_norm_pairs(model)["conv1"].conv
    out = taylor_scores(model, {"conv1": conv}, _batches(16))
    assert out["conv1"].shape == (conv.out_channels,) and (out["conv1"] > 0).all()
    assert all(p.grad is None and p.requires_grad for p in model.parameters()) and not model.training


def _lesion_check_ctx(cfg, units):
    """What check_lesion_analysis reads: the typed capture/metrics knobs, the units, no trained run."""
    knobs = stage_inputs(cfg).knobs
    return SimpleNamespace(knobs=knobs, units=units, trained=None), typed(cfg.analysis.lesion, LesionAnalysis)


def test_a_count_above_a_layer_takes_the_whole_layer_and_says_so_once(tmp_path, caplog):
    """Issue 23 item 11: N means at most N per layer (EfficientNet-B0's SE convs have 4 channels)."""
    cfg = make_cfg("analyze", ["logger=none", "model.width=0.125", "analysis=lesion",
                               "analysis.lesion.channels=20"], tmp_path)
    units = conv_norm_pairs(build_model("resnet18", num_classes=10, width=0.125))
    with caplog.at_level("INFO", logger="axes_pipeline"):
        check_lesion_analysis(*_lesion_check_ctx(cfg, units))
    said = [r.getMessage() for r in caplog.records if "lesion.channels" in r.getMessage()]
    small = [n for n, u in units.items() if u.conv.out_channels < 20]      # the 8- and 16-channel layers
    assert len(said) == 1 and said[0].startswith(f"analysis.lesion.channels=20: {len(small)} layer(s) have fewer "
                                                 f"channels and are lesioned whole: conv1 (8), ")
    assert len(select_channels(8, 20, 0, "conv1")) == 8 and len(select_channels(32, 20, 0, "x")) == 20
    for bad in ("analysis.lesion.replace=[nope]", "analysis.lesion.layers=[nope]"):
        cfg = make_cfg("analyze", ["logger=none", "analysis=lesion", bad], tmp_path)
        with pytest.raises(UserError):
            check_lesion_analysis(*_lesion_check_ctx(cfg, units))
    # the range (N >= 1) is the schema's, checked when the stage builds its inputs
    cfg = make_cfg("analyze", ["logger=none", "analysis=lesion", "analysis.lesion.channels=0"], tmp_path)
    with pytest.raises(UserError, match=r"analysis.lesion.channels=0 is out of range: it must be >= 1"):
        stage_inputs(cfg)


LAYERS = "[conv1,layer2.0.conv1,layer4.1.conv2]"
SMALL = ["capture.n_cal=300", "capture.samples_per_image=4", "capture.batch_size=150", f"capture.layers={LAYERS}",
         "graphs.null_shuffles=1", "analysis.lesion.channels=6", "analysis.lesion.eval_samples=200",
         "analysis.lesion.n_boot=200", "analysis.lesion.taylor_images=128"]


def test_lesion_count_checked_before_any_work(tiny_run):
    root, overrides = tiny_run
    cfg = make_cfg("analyze", [*overrides, "analysis=lesion", *SMALL, "analysis.lesion.channels=0"], root)
    out = Path(cfg.paths.run_dir) / "analyze"
    with pytest.raises(UserError, match="analysis.lesion.channels=0 is out of range"):
        run_analysis(cfg)
    assert not (out / "lesions.csv").exists()


def test_lesion_analysis_end_to_end(tiny_run):
    root, overrides = tiny_run
    cfg = make_cfg("analyze", [*overrides, "analysis=lesion", *SMALL], root)
    summary = run_analysis(cfg)
    out = Path(cfg.paths.run_dir) / "analyze"
    df = pd.read_csv(out / "lesions.csv")
    assert len(df) == 18 and sorted(df["layer"].unique()) == sorted(LAYERS.strip("[]").split(","))
    for col in ("layer", "channel", "damage_loss", "damage_acc", "replaced_hull_damage_loss",
                "replaced_hull_damage_acc", "replaced_all_damage_loss", "replaced_all_damage_acc", "recovery_hull",
                "recovery_all", "input_capture", "peer_overlap", "full_explained", "hull_score", "l1", "taylor",
                "task_info", "it_bin", "hull_members"):
        assert col in df.columns, col
    assert df["damage_loss"].notna().all() and df["taylor"].notna().all()
    assert (df["fit_full_explained"] - df["full_explained"]).abs().max() < 1e-6   # same regression as the metrics
    assert (df["fit_hull_explained"] - df["hull_explained"]).abs().max() < 1e-6   # same hull members
    # each layer's no-op row (a channel replaced by itself) is the unlesioned network
    assert (df["loss_base"] - summary["lesion"]["base_loss"]).abs().max() < 1e-5
    assert (df["acc_base"] == summary["lesion"]["base_acc"]).all()
    binned = pd.read_csv(out / "lesion_binned.csv")
    assert {"layer", "bin", "predictor", "rho", "p", "n"} <= set(binned.columns)
    assert set(binned["predictor"]) == {"input_capture", "peer_overlap", "full_explained", "hull_score", "l1",
                                        "taylor", "task_info"}
    saved = read_json(out / "lesion_summary.json")
    for key in ("base_loss", "base_acc", "incremental_r2", "recovery", "per_layer", "binned_rho_mean"):
        assert key in saved, key
    r2 = saved["incremental_r2"]["pooled"]
    assert r2["n"] == int((~df["dead"]).sum()) and {"delta_r2", "ci_lo", "ci_hi", "p_f"} <= set(r2)
    for png in ("lesion_damage", "lesion_recovery"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 1000
    lesion = read_json(out / "analyze_summary.json")["lesion"]
    assert lesion["channels_lesioned"] == 18 and lesion == pytest.approx(summary["lesion"], nan_ok=True)
    assert 0.0 <= lesion["base_acc"] <= 1.0

    # a second run resumes from the per-layer parts and reproduces the table
    again = run_analysis(cfg)
    assert read_json(out / "lesion_summary.json")["resumed_layers"] == 3
    pd.testing.assert_frame_equal(pd.read_csv(out / "lesions.csv"), df)
    assert again["lesion"]["delta_r2"] == pytest.approx(summary["lesion"]["delta_r2"], nan_ok=True)

    # a damaged part (cut short) is recomputed, not used: the same table again
    part = sorted((out / "lesion_parts").glob("*.csv"))[0]
    part.write_text("\n".join(part.read_text().splitlines()[:-2]) + "\n")
    run_analysis(cfg)
    assert read_json(out / "lesion_summary.json")["resumed_layers"] == 2
    pd.testing.assert_frame_equal(pd.read_csv(out / "lesions.csv"), df)


def test_batched_correct_counts_equal_torchmetrics_samplewise_accuracy():
    """The hand-written per-lesion count kept in LesionEngine (faster, exact int64; see the comment
    there) gives what torchmetrics' samplewise multiclass accuracy gives, times the batch size."""
    from torchmetrics.functional.classification import multiclass_accuracy

    g = torch.Generator().manual_seed(3)
    n_l, b, c = 6, 9, 10
    logits, yy = torch.randn(n_l * b, c, generator=g), torch.randint(0, c, (n_l * b,), generator=g)
    hand = (logits.argmax(1) == yy).view(n_l, b).sum(1)
    tm = multiclass_accuracy(logits.view(n_l, b, c).permute(0, 2, 1), yy.view(n_l, b), num_classes=c,
                             average="micro", multidim_average="samplewise")
    assert torch.equal((tm.double() * b).round().long(), hand)
