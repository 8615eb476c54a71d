"""Any CNN (issue 13): ``model=torchvision model.arch=<name>`` and ``model=custom``, the
activation point per unit, and analyze (axes, lesions, propagation) + a FLOPs-matched prune of one
score on one representative of each of the 16 torchvision CNN families (random weights, random
images, small widths, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from axes_pipeline.errors import UserError
from axes_pipeline.models import build_model, capture_point, conv_norm_pairs, model_knobs

from .helpers import make_cfg
from .reference.families import REPRESENTATIVES, check_family

#: families whose pruning Torch-Pruning refuses, and the words their one-line reason must hold
PRUNE_REFUSED = {"ShuffleNetV2": "channel shuffle"}
TOLERANCE = 0.005   # conf/pruning/default.yaml


class TinyNet(nn.Module):
    """A user's own network for model=custom: conv → ReLU (no norm) → conv → BN → ReLU → linear."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.a = nn.Conv2d(3, width, 3, padding=1)
        self.relu = nn.ReLU()
        self.b = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.relu2(self.bn(self.b(self.relu(self.a(x)))))
        return self.head(x.mean((2, 3)))


# ------------------------------------------------------------------------------ the 16 families


@pytest.mark.slow   # 16 stage runs of 5–30 s each: each a unit of its own for the two workers
@pytest.mark.parametrize("family", list(REPRESENTATIVES))
def test_family_end_to_end(family):
    arch, width, side = REPRESENTATIVES[family]
    r = check_family(arch, width, side, tolerance=TOLERANCE)
    assert r.layers > 0 and r.analysed == r.layers, family                # every conv has its axes rows
    assert r.lesioned == 3, family                                        # three layers lesioned
    assert all(reason and "\n" not in reason for _, reason in r.propagation_refused)
    assert r.propagation_pairs > 0, family
    if family == "ConvNeXt":   # its 1x1 convs are channels-last nn.Linear: units, linked, prunable (issue 20)
        assert (r.layers, r.linear_units, r.propagation_pairs, r.linear_groups) == (58, 36, 39, 18)
    if family in PRUNE_REFUSED:
        assert r.prune_error and "\n" not in r.prune_error and PRUNE_REFUSED[family] in r.prune_error
        return
    assert r.prune_error is None, r.prune_error
    assert r.max_flops_error <= TOLERANCE, (family, r.targets, r.achieved)  # fvcore on the pruned nets
    assert r.pruned_runs, family


def test_refusals_carry_their_reason():
    """Grouped convs are kept whole with a reason; a concatenation is followed, not refused."""
    arch, width, side = REPRESENTATIVES["ResNeXt"]
    from axes_pipeline.pruning import build_groups

    model = build_model(f"tv_{arch}", 10, width=width).eval()
    groups = build_groups(model, torch.randn(1, 3, side, side))
    assert "layer2.0.conv2" in groups.refused and "groups=32" in groups.refused["layer2.0.conv2"]
    assert not any("layer2.0.conv2" in g.convs for g in groups.groups)   # layer1 at this width is depthwise
    from axes_pipeline.analyses.propagation import link_report

    links, refused = link_report(model)
    assert ("layer2.0.conv2", "grouped/depthwise receiver (groups=32)") in refused
    dense = build_model("tv_densenet121", 10, width=0.25).eval()
    links, refused = link_report(dense)
    into = [(u, o) for u, d, o in links if d == "features.denseblock1.denselayer3.conv1"]
    # the 3rd dense layer reads [stem pool, layer 1, layer 2] concatenated: one link per part, at its offset
    assert [u for u, _ in into] == ["features.conv0", "features.denseblock1.denselayer1.conv2",
                                    "features.denseblock1.denselayer2.conv2"]
    assert [o for _, o in into] == [0, 16, 24]


# ------------------------------------------------------------------------------ building


def test_torchvision_models_build_with_classes_and_width():
    m = build_model("tv_mobilenet_v3_small", 7, width=0.5)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    full = build_model("tv_mobilenet_v3_small", 7)
    assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in full.parameters())
    assert model_knobs("tv_resnet50") == {"arch": "resnet50"}
    with pytest.raises(UserError, match="no width multiplier"):
        build_model("tv_alexnet", 10, width=0.5)
    with pytest.raises(UserError, match="resnet50"):
        build_model("tv_resnet5", 10)
    with pytest.raises(UserError, match="disagree"):
        build_model("tv_resnet50", 10, arch="vgg11")


def test_squeezenet_conv_classifier_is_not_analysed():
    m = build_model("tv_squeezenet1_0", 10)
    assert "classifier.1" not in conv_norm_pairs(m)


def test_torchvision_weights_from_a_local_file(tmp_path):
    src = build_model("tv_resnet18", 10)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    m = build_model("tv_resnet18", 10, weights=str(path))
    assert torch.equal(m.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    assert m.pretrained_report.skipped_classifier            # the classifier stays at init


def test_torchvision_and_custom_configs(tmp_path):
    from axes_pipeline.training.train import instantiate_model

    a = make_cfg("train", ["model=torchvision", "model.arch=efficientnet_b0", "model.width=0.25"], tmp_path)
    b = make_cfg("train", ["model=torchvision", "model.arch=regnet_y_400mf", "model.width=0.25"], tmp_path)
    assert a.model.name == "tv_efficientnet_b0" and a.paths.run_dir != b.paths.run_dir
    assert instantiate_model(a.model, 10).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    c = make_cfg("train", ["model=custom", "model.net._target_=tests.test_families.TinyNet", "+model.net.width=4"],
                 tmp_path)
    net = instantiate_model(c.model, 3)
    assert isinstance(net, TinyNet) and net.head.out_features == 3 and net.a.out_channels == 4
    with pytest.raises(UserError, match="model.net._target_"):
        instantiate_model(make_cfg("train", ["model=custom"], tmp_path).model, 10)
    with pytest.raises(UserError, match="4 outputs but the data has 10"):
        build_model("custom", 10, net={"_target_": "tests.test_families.TinyNet", "num_classes": 4})
    with pytest.raises(UserError, match="cannot be imported"):
        build_model("custom", 10, net={"_target_": "no_such_pkg.Net"})
    with pytest.raises(UserError, match="ImageNet"):
        build_model("custom", 10, pretrained=True, net={"_target_": "tests.test_families.TinyNet"})


# ------------------------------------------------------------------------------ activation point


def test_capture_point_per_unit():
    from axes_pipeline.capture import capture_activations

    units = conv_norm_pairs(TinyNet().eval())
    assert capture_point(units["a"], "pre_bn") == "conv_out" and capture_point(units["b"], "pre_bn") == "pre_bn"
    assert capture_point(units["a"], "post_act") == "conv_act" and capture_point(units["b"], "post_act") == "post_act"
    cn = conv_norm_pairs(build_model("tv_convnext_tiny", 10, width=0.125))
    assert capture_point(cn["features.1.0.block.0"], "pre_bn") == "pre_ln"       # LayerNorm after the dwconv
    assert capture_point(cn["features.2.1"], "post_bn") == "conv_out"            # downsampling conv, no norm
    # post_act on a conv with no norm applies its own ReLU
    model = TinyNet().eval()
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))]
    cap = capture_activations(model, {"a": conv_norm_pairs(model)["a"]}, data, point="post_act",
                              samples_per_image=4, progress=False, keep_samples=True)
    raw = capture_activations(model, {"a": conv_norm_pairs(model)["a"]}, data, samples_per_image=4, progress=False,
                              keep_samples=True)
    assert (cap.acts["a"] >= 0).all() and torch.equal(cap.acts["a"], raw.acts["a"].clamp_min(0))


# ------------------------------------------------------------------------------ peers of grouped convs


def test_peers_layer_or_group():
    from axes_pipeline.metrics import covariance
    from axes_pipeline.metrics.axes import channel_axes_from_moments
    from axes_pipeline.metrics.peers import channel_axes_by_peers

    unit = conv_norm_pairs(_Grouped().eval())["conv"]
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, 3, generator=g, dtype=torch.float64)
    acts = torch.cat([base, base + 0.1 * torch.randn(200, 3, generator=g, dtype=torch.float64)], 1)  # ch i ~ ch i+3
    t = torch.randn(200, generator=g, dtype=torch.float64)
    cov = covariance(acts, t)
    knobs = dict(sigma0="median", hull_eps=0.05, hull_max=10, hull_order="correlation", ridge=1e-3, pool=50, top=10)
    layer = channel_axes_by_peers(cov, unit, peers="layer", **knobs)
    assert torch.equal(layer["peer_overlap"], channel_axes_from_moments(cov, **knobs)["peer_overlap"])
    group = channel_axes_by_peers(cov, unit, peers="group", **knobs)
    # the near-copy of channel i sits in the other conv group: a peer of the layer, not of the group
    assert (layer["full_explained"] > 0.9).all() and (group["full_explained"] < 0.5).all()
    assert torch.allclose(group["input_capture"], layer["input_capture"])      # the layer's σ0² in both
    with pytest.raises(UserError, match="metrics.peers"):
        channel_axes_by_peers(cov, unit, peers="block", **knobs)


def test_one_dead_rule_in_layer_and_group_peers_and_gradients():
    # METHODS §1: dead = variance <= DEAD_RTOL x the layer's largest (metrics.gaussian.dead_channels), in
    # every module. Conv group 1 holds only channels ~1e-9 of the layer's scale (variance ~1e-18 of the
    # largest): dead for the layer, and for its group too, though they are the group's own largest.
    from axes_pipeline.metrics import covariance, dead_channels, gradient_cosines
    from axes_pipeline.metrics.peers import channel_axes_by_peers

    unit = conv_norm_pairs(_Grouped().eval())["conv"]
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(300, 6, generator=g, dtype=torch.float64)
    acts[:, 3:] *= 1e-9
    cov = covariance(acts, acts[:, 0] + torch.randn(300, generator=g, dtype=torch.float64))
    knobs = dict(sigma0="median", hull_eps=0.05, hull_max=10, hull_order="correlation", ridge=1e-3, pool=50, top=10)
    expect = [False] * 3 + [True] * 3
    assert dead_channels(torch.diagonal(cov)[1:]).tolist() == expect
    for peers in ("layer", "group"):
        out = channel_axes_by_peers(cov, unit, peers=peers, **knobs)
        assert out["dead"].tolist() == expect, peers
        assert (out["input_capture"][3:] == 0).all() and (out["task_info"][3:] == 0).all(), peers
    # the gradient analysis: D = w'Σ_X w is the channel's variance, dead by the same rule (cosines 0)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    w[2] *= 1e-9
    sigma = torch.eye(5, dtype=torch.float64) + 0.1
    cos = gradient_cosines(w @ sigma, torch.randn(5, generator=g, dtype=torch.float64), w)
    assert cos["dead"].tolist() == [False, False, True] and float(cos["cos_euclid"][2]) == 0.0
    assert torch.equal(cos["dead"], dead_channels(cos["signal"]))


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, groups=2)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


# ------------------------------------------------------------------------------ lesions on the general graph


@pytest.mark.parametrize("arch,width,side,pick", [
    ("densenet121", 0.25, 32, ["features.denseblock1.denselayer2.conv2", "features.transition1.conv"]),  # concat, no norm
    ("efficientnet_b0", 0.25, 32, ["features.2.0.block.2.fc1", "features.2.0.block.3.0"]),                # SE conv, project
    ("googlenet", 1.0, 32, ["inception3a.branch2.1.conv"]),                                    # a concatenated branch
    ("convnext_tiny", 0.125, 32, ["features.1.0.block.3", "features.1.0.block.5"]),          # channels-last Linears
])
def test_batched_lesions_equal_the_weight_path_on_general_graphs(arch, width, side, pick):
    import numpy as np

    from axes_pipeline.analyses.lesion_engine import LesionEngine, Lesions, trace

    from .reference.lesions import weight_lesion_eval

    torch.manual_seed(0)
    model = build_model(f"tv_{arch}", 10, width=width).eval()
    units = conv_norm_pairs(model)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, side, side, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    graph = trace(model)
    for layer in pick:
        unit = units[layer]
        c = unit.out_channels
        chans = [0, c - 1]
        ref = weight_lesion_eval(model, unit, chans, batches)
        for split in (True, False):
            got = LesionEngine(model, unit, graph=graph, split=split).evaluate(batches, Lesions.zero(chans, c))
            np.testing.assert_allclose(got.loss, ref.loss, rtol=0, atol=1e-4, err_msg=f"{layer} split={split}")


# ------------------------------------------------------------------------------ the real stages


def test_train_analyze_prune_a_torchvision_model(tmp_path):
    """model=torchvision through train / analyze (axes + propagation) / prune, on digits: the
    capture point lands in axes.csv, refusals in propagation_refused.csv and prune_refused.csv."""
    import pandas as pd

    from axes_pipeline.analyses.analyze import run_analysis
    from axes_pipeline.pruning.run import run_prune
    from axes_pipeline.tasks import run_task
    from axes_pipeline.training.train import run_training

    model = ["model=torchvision", "model.arch=regnet_y_400mf", "model.width=0.25", "data.batch_size=64",
             "trainer.max_epochs=1", "callbacks.progress_bar=false", "logger=none"]
    run_task(run_training, make_cfg("train", model, tmp_path))
    cfg = make_cfg("analyze", [*model, "analysis=propagation", "capture.n_cal=128", "capture.samples_per_image=2",
                               "capture.batch_size=64", "graphs.edge_fraction=0", "gradients.enabled=false",
                               "plots=false"], tmp_path)
    run_analysis(cfg)
    out = Path(cfg.paths.run_dir)
    axes = pd.read_csv(out / "analyze" / "axes.csv")
    assert {"pre_bn", "conv_out"} <= set(axes["capture_point"])          # SE convs have no norm
    refused = pd.read_csv(out / "analyze" / "propagation_refused.csv")
    assert refused["reason"].str.contains("grouped/depthwise receiver").any()
    run_prune(make_cfg("prune", [*model, "pruning.scores=[l1]", "pruning.targets=[0.7]", "pruning.latency=false"],
                       tmp_path))
    kept = pd.read_csv(out / "prune" / "prune_refused.csv")
    assert kept["reason"].str.contains("grouped conv").all() and len(kept) > 0


def test_score_without_values_is_flagged(caplog):
    """bn_scale on a network without norms: every group falls back to the tie-break, and says so."""
    from axes_pipeline.models import conv_layers
    from axes_pipeline.pruning import ScoreContext, build_groups, group_scores, resolve_score

    model = build_model("tv_vgg11", 10, width=0.125).eval()
    groups = build_groups(model, torch.randn(1, 3, 32, 32))
    values = resolve_score("bn_scale")(ScoreContext(model, conv_layers(model)), 0)
    with caplog.at_level("WARNING", logger="axes_pipeline"):
        group_scores(groups, values)
    assert f"score undefined for {len(groups.groups)} of {len(groups.groups)} channel groups" in caplog.text


def test_pruned_torchvision_model_exports_and_reloads(tmp_path):
    import numpy as np

    from axes_pipeline.pruning import build_groups, prune_physically
    from axes_pipeline.pruning.export import load_pruned, model_spec, save_pruned

    model = build_model("tv_mobilenet_v3_small", 10, width=0.25).eval()
    x = torch.randn(1, 3, 32, 32)
    groups = build_groups(model, x)
    rng = np.random.default_rng(0)
    keep = [np.r_[True, rng.random(g.size - 1) > 0.4] for g in groups.groups]
    pruned, history = prune_physically(model, groups, keep, x)
    spec = model_spec({"name": "tv_mobilenet_v3_small", "arch": "mobilenet_v3_small", "width": 0.25}, 10)
    path = save_pruned(tmp_path / "p.pt", spec, x.shape, history, pruned)
    with torch.no_grad():
        assert torch.allclose(load_pruned(path)(x), pruned(x), atol=1e-6)


def test_too_small_input_is_one_line():
    m = build_model("tv_inception_v3", 10).eval()
    with pytest.raises(UserError, match="at least 75x75, got 32x32"):
        m(torch.randn(1, 3, 32, 32))
