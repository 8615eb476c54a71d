"""Cross-layer propagation (METHODS §7) on a network whose routing is known, and the training
dynamics stage (METHODS §6) on the tiny digits run: one row per (epoch, layer), resumable,
several seeds, and a clear error for a run without per-epoch checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir

from axes_pipeline.analyses.propagation import (
    conv_links,
    influence_matrix,
    pair_propagation,
    post_norm_sigma,
    propagation_table,
    routed,
)
from axes_pipeline.capture import capture_activations
from axes_pipeline.errors import UserError
from axes_pipeline.models import conv_norm_pairs
from axes_pipeline.runs import read_json

from .helpers import CONF, make_cfg
from .reference.samples import layer_analysis_from_samples

KNOBS = {"sigma0": "median", "hull_eps": 0.05, "hull_max": 10, "hull_order": "correlation", "ridge": 1e-3,
         "pool": 50, "top": 10}


class TwoConv(nn.Module):
    """conv1 → bn1 → relu → conv2 → bn2 → relu → pool → fc, where conv2's channel j reads only
    upstream channel π(j) (weight 1 at the kernel centre)."""

    def __init__(self, channels: int, perm: torch.Tensor, scales: torch.Tensor, gamma: torch.Tensor):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, 4)
        with torch.no_grad():
            w = torch.randn(channels, 3, 3, 3, generator=g)
            self.conv1.weight.copy_(w / w.flatten(1).norm(dim=1)[:, None, None, None] * scales[:, None, None, None])
            self.bn1.weight.copy_(gamma)                      # eval BN: running mean 0, var 1
            self.conv2.weight.zero_()
            self.conv2.weight[torch.arange(channels), perm, 1, 1] = 1.0
            self.fc.weight.copy_(torch.randn(4, channels, generator=g))

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def _known_routing(gamma_power: float, C: int = 24):
    """Capture both layers and compute their axes; conv1 channel i has output std ∝ scales[i] and
    post-BN gain γ_i = scales[i]**gamma_power, so conv2's channel j has std ∝ scales[π(j)]**(1+gamma_power)."""
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(C, generator=g)
    scales = torch.logspace(0, 1, C)[torch.randperm(C, generator=g)]
    model = TwoConv(C, perm, scales, scales**gamma_power).eval()
    units = conv_norm_pairs(model)
    x = torch.randn(256, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (256,), generator=g)
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    cap = capture_activations(model, units, loader, samples_per_image=8, progress=False, keep_samples=True)
    rows = [layer_analysis_from_samples(n, i, cap.acts[n], cap.target, units[n], knobs=KNOBS, dtype=torch.float64,
                                        device=torch.device("cpu"), graphs=None).rows for i, n in enumerate(units)]
    return model, units, cap, pd.concat(rows, ignore_index=True), perm


def test_links_and_exact_routing():
    model, units, cap, axes, perm = _known_routing(0.0)
    assert conv_links(model, units) == [("conv1", "conv2")]
    sigma = post_norm_sigma(units["conv1"], cap.acts["conv1"].double().std(0))
    a = influence_matrix(model.conv2.weight, sigma)
    assert torch.allclose(a.sum(1), torch.ones(len(perm), dtype=a.dtype))
    ix = axes[axes.layer == "conv1"].sort_values("channel")["input_capture"].to_numpy()
    np.testing.assert_allclose(routed(a, ix), ix[perm.numpy()])     # m̃_j = I_X(π(j)) exactly


def test_residual_links_skip_or_follow_the_main_branch():
    from axes_pipeline.models import build_model

    model = build_model("resnet18", num_classes=10, width=0.125).eval()
    units = conv_norm_pairs(model)
    skip = conv_links(model, units, residual="skip")
    assert len(skip) == 9 and ("layer1.0.conv2", "layer1.1.conv1") not in skip
    main = conv_links(model, units)            # the default links across adds (METHODS §7)
    assert main == conv_links(model, units, residual="main")
    assert set(skip) < set(main)
    # behind each block's add: the block's last conv (its main branch), never the shortcut
    for up, down in [("layer1.0.conv2", "layer1.1.conv1"), ("layer1.1.conv2", "layer2.0.conv1"),
                     ("layer1.1.conv2", "layer2.0.downsample.0"), ("layer3.1.conv2", "layer4.0.conv1")]:
        assert (up, down) in main, (up, down)
    assert not any("downsample" in up for up, _ in main)
    # + one link per conv that reads a block output: 7 block inputs' conv1 and 3 shortcut convs
    assert len(main) == 9 + 10


def test_residual_main_branch_whichever_summand_comes_first():
    # MobileNetV2 adds `x + self.conv(x)`: the shortcut is the *first* summand, yet the receiver
    # behind the add is linked to the block's own project conv, never to the previous block's.
    from axes_pipeline.models import build_model

    model = build_model("mobilenetv2", num_classes=10).eval()
    units = conv_norm_pairs(model)
    skip, main = conv_links(model, units, residual="skip"), conv_links(model, units)
    across = [link for link in main if link not in skip]
    assert ("features.5.conv.2", "features.6.conv.0.0") in across
    assert ("features.6.conv.2", "features.7.conv.0.0") in across
    assert ("features.4.conv.2", "features.6.conv.0.0") not in main
    block = lambda name: int(name.split(".")[1])   # noqa: E731
    assert across and all(block(up) == block(down) - 1 for up, down in across)


@pytest.mark.parametrize("gamma_power, sign", [(0.0, 1.0), (-2.0, -1.0)])
def test_known_routing_gives_expected_sign(gamma_power, sign):
    # γ = 1: conv2 channel j copies relu(conv1 channel π(j)), so I_X' rises with I_X(π(j)): ρ ≈ +1.
    # γ_i = 1/scale_i²: the post-BN std ∝ 1/scale, so I_X' falls as I_X(π(j)) rises: ρ ≈ −1.
    model, units, cap, axes, _ = _known_routing(gamma_power)
    table = propagation_table(model, units, cap, axes, null_draws=40, seed=3)
    assert set(table.pairing) == {"local_to_local", "target_to_target", "local_to_target", "target_to_local"}
    ll = table[table.pairing == "local_to_local"].iloc[0]
    assert (ll.upstream, ll.downstream, ll.n) == ("conv1", "conv2", 24)
    assert sign * ll.rho > 0.95
    assert abs(ll.null_rho) < 0.15                                     # shuffled wiring: no relation
    assert table.null_rho.abs().max() < 0.2


def test_pair_propagation_signs_and_null():
    C = 64
    rng = np.random.default_rng(0)
    perm = rng.permutation(C)
    weight = torch.zeros(C, C, 3, 3)
    weight[np.arange(C), perm, 0, 2] = 1.0
    ix, it = rng.random(C), rng.random(C)
    up = {"input_capture": ix, "task_info": it}
    down = {"input_capture": np.exp(ix[perm]), "task_info": -it[perm]}
    rows = {r["pairing"]: r for r in pair_propagation(weight, torch.rand(C) + 0.5, up, down, null_draws=50, seed=1)}
    assert rows["local_to_local"]["rho"] == pytest.approx(1.0)
    assert rows["target_to_target"]["rho"] == pytest.approx(-1.0)
    for name in rows:
        assert abs(rows[name]["null_rho"]) < 0.1
    cols = pair_propagation(weight, torch.ones(C), up, down, null_draws=50, null="columns", seed=1)
    assert all(abs(r["null_rho"]) < 0.1 for r in cols)


# ----------------------------------------------------------------------------- dynamics

def _run_dir(root: Path, seed: int = 42) -> Path:
    return root / "runs" / "default" / "digits-resnet18-w0.125" / f"seed{seed}"


@pytest.fixture(scope="module")
def dyn_root(tiny_run, tmp_path_factory):
    """A private copy of the tiny run (so this module's outputs do not touch the shared one)."""
    root, overrides = tiny_run
    mine = tmp_path_factory.mktemp("dyn") / "root"
    shutil.copytree(root, mine, ignore=shutil.ignore_patterns("analyze"))
    return mine, overrides


# The axes of the restored model (always computed first) on one layer only: dynamics picks its own six.
SMALL = ["capture.n_cal=200", "capture.samples_per_image=4", "capture.layers=[conv1]", "gradients.enabled=false",
         "graphs.null_shuffles=1", "device=cpu"]


def test_dynamics_rows_and_resume(dyn_root):
    from axes_pipeline.analyses.analyze import run_analysis

    root, overrides = dyn_root
    cfg = make_cfg("analyze", [*overrides, "analysis=dynamics", *SMALL], root)
    first = run_analysis(cfg)["dynamics"]
    out = _run_dir(root) / "analyze"
    dyn = pd.read_csv(out / "dynamics.csv")
    assert sorted(dyn.epoch.unique()) == [0, 1, 2, 3]
    assert dyn.groupby("epoch").layer.nunique().eq(6).all() and len(dyn) == 4 * 6
    assert not dyn.duplicated(["epoch", "layer"]).any()
    for col in ("align_input_capture_task_info", "modularity_gap", "hull_size_mean", "hull_saturated_frac", "s3_s2"):
        assert dyn[col].notna().all(), col
    assert first["epochs_computed"] == 4 and first["first_epoch"] == 0 and first["last_epoch"] == 3
    assert (out / "plots" / "dynamics.png").is_file() and (out / "dynamics_curves.csv").is_file()

    parts = sorted((out / "dynamics_parts").glob("epoch_*.csv"))
    assert len(parts) == 4
    stamps = {p: p.stat().st_mtime_ns for p in parts}
    again = run_analysis(make_cfg("analyze", [*overrides, "analysis=dynamics", *SMALL, "plots=false"], root))["dynamics"]
    assert again["epochs_computed"] == 0                         # nothing recomputed
    assert {p: p.stat().st_mtime_ns for p in parts} == stamps
    pd.testing.assert_frame_equal(pd.read_csv(out / "dynamics.csv"), dyn)

    # a damaged part (NaN where a number must be) is recomputed, not used
    bad = pd.read_csv(parts[1])
    bad.loc[0, "hull_size_mean"] = np.nan
    bad.to_csv(parts[1], index=False)
    again = run_analysis(make_cfg("analyze", [*overrides, "analysis=dynamics", *SMALL, "plots=false"], root))["dynamics"]
    assert again["epochs_computed"] == 1
    pd.testing.assert_frame_equal(pd.read_csv(out / "dynamics.csv"), dyn)


def test_dynamics_against_the_final_target(dyn_root):
    """dynamics.target=final measures every epoch against the final network's T: at the last epoch
    that is the epoch's own T, so the two modes agree there and (generally) differ before."""
    from axes_pipeline.analyses.analyze import run_analysis

    root, overrides = dyn_root
    twin = _run_dir(root, 45)
    if not twin.exists():
        shutil.copytree(_run_dir(root), twin, ignore=shutil.ignore_patterns("analyze"))
    common = [*overrides, "seed=45", "analysis=dynamics", *SMALL, "plots=false", "analysis.dynamics.epochs=[0,3]"]
    run_analysis(make_cfg("analyze", common, root))
    own = pd.read_csv(twin / "analyze" / "dynamics.csv")
    run_analysis(make_cfg("analyze", [*common, "analysis.dynamics.target=final"], root))
    final = pd.read_csv(twin / "analyze" / "dynamics.csv")
    col = "align_input_capture_task_info"
    last, first = own.epoch == 3, own.epoch == 0
    np.testing.assert_allclose(final.loc[last, col], own.loc[last, col], atol=1e-9)
    assert not np.allclose(final.loc[first, col], own.loc[first, col])
    with pytest.raises(UserError, match="analysis.dynamics.target"):
        run_analysis(make_cfg("analyze", [*common, "analysis.dynamics.target=nope"], root))


def test_dynamics_over_seeds(dyn_root):
    from axes_pipeline.analyses.analyze import run_analysis

    root, overrides = dyn_root
    twin = _run_dir(root, 43)
    if not twin.exists():     # the same checkpoints under seed=43: identical curves, SD 0
        shutil.copytree(_run_dir(root), twin, ignore=shutil.ignore_patterns("analyze"))
    cfg = make_cfg("analyze", [*overrides, "analysis=dynamics", *SMALL, "plots=false",
                               "analysis.dynamics.epochs=[0,3]", "analysis.dynamics.seeds=[42,43]"], root)
    stored = sum((_run_dir(root) / "analyze" / "dynamics_parts" / f"epoch_{e:03d}.csv").is_file() for e in (0, 3))
    head = run_analysis(cfg)["dynamics"]
    assert head["seeds"] == [42, 43] and head["epochs"] == 2
    assert head["epochs_computed"] == 2 + (2 - stored)   # stored epochs of seed 42 are read back
    both = pd.read_csv(_run_dir(root) / "analyze" / "dynamics_seeds.csv")
    assert sorted(both.seed.unique()) == [42, 43] and len(both) == 2 * 2 * 6
    curves = pd.read_csv(_run_dir(root) / "analyze" / "dynamics_curves.csv")
    assert (curves.n_seeds == 2).all()
    assert curves["hull_size_mean_sd"].abs().max() < 1e-9


def test_dynamics_without_epoch_checkpoints(dyn_root):
    from axes_pipeline.analyses.analyze import run_analysis

    root, overrides = dyn_root
    plain = _run_dir(root, 44)
    if not plain.exists():
        shutil.copytree(_run_dir(root), plain, ignore=shutil.ignore_patterns("analyze", "epoch_*.ckpt"))
    cfg = make_cfg("analyze", [*overrides, "seed=44", "analysis=dynamics", *SMALL], root)
    with pytest.raises(UserError, match=r"checkpoint\.every_epoch=true"):
        run_analysis(cfg)
    assert not (plain / "analyze").exists()      # stopped before any work
    # analysis=all (dynamics.required=false): dynamics is skipped with a note, the rest still runs
    cfg = make_cfg("analyze", [*overrides, "seed=44", "analysis=[axes,dynamics]", "analysis.dynamics.required=false",
                               *SMALL, "plots=false"], root)
    summary = run_analysis(cfg)
    assert "every_epoch" in summary["dynamics"]["skipped"] and (plain / "analyze" / "axes.csv").is_file()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        every = compose(config_name="analyze", overrides=["analysis=all"])
    assert set(every.analysis) == {"axes", "lesion", "propagation", "dynamics", "definitions", "linear_gaussian"}
    assert every.analysis.dynamics.required is False and every.analysis.definitions.required is False


def test_propagation_stage_on_tiny_run(dyn_root, capsys):
    from axes_pipeline.analyses.analyze import run_analysis

    root, overrides = dyn_root
    small = [o for o in SMALL if not o.startswith("capture.layers")]
    cfg = make_cfg("analyze", [*overrides, "analysis=propagation", *small, "analysis.propagation.null_draws=5",
                               "capture.layers=[conv1,layer1.0.conv1,layer1.0.conv2,layer2.0.conv1]"], root)
    head = run_analysis(cfg)["propagation"]
    out = _run_dir(root) / "analyze"
    table = pd.read_csv(out / "propagation.csv")
    # conv1 → layer1.0.conv1 → layer1.0.conv2 are linked; layer2.0.conv1 reads a residual sum
    assert list(dict.fromkeys(zip(table.upstream, table.downstream))) == [
        ("conv1", "layer1.0.conv1"), ("layer1.0.conv1", "layer1.0.conv2")]
    assert len(table) == 2 * 4 and table.rho.notna().all() and table.null_rho.notna().all()
    assert head["pairs"] == 2 and head["local_to_local_rho"] is not None
    assert (out / "plots" / "propagation.png").is_file()
    # the count of linked pairs and the linking rule travel with the H3 result
    assert head["residual"] == "main" and cfg.analysis.propagation.residual == "main"
    stored = read_json(out / "analyze_summary.json")["propagation"]
    assert (stored["pairs"], stored["residual"]) == (2, "main")
    assert "propagation over 2 linked pairs (residual=main)" in capsys.readouterr().out
