"""Backbones, analysable conv layers, conv → norm → activation units, offline weight loading."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from omegaconf import OmegaConf

from axes_pipeline.errors import UserError
from axes_pipeline.models import (
    MODEL_NAMES,
    ConvUnit,
    FunctionalAct,
    analysable_layers,
    build_model,
    classifier_name,
    conv_layers,
    conv_norm_pairs,
    depth_spaced_layers,
    example_input,
    model_knobs,
)
from axes_pipeline.models.graph import out_channels

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
SMALL = 0.125


def _no_network(url, dst, *args, **kwargs):
    import urllib.error

    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


@pytest.fixture(autouse=True)
def _empty_torch_home(tmp_path, monkeypatch):
    """No test sees a real hub cache or reaches the network (downloads fail as they do offline)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)


def _forward_call_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Convs, and Linears that run on a 4-d (channels-last) map, in the order the forward calls them."""
    order: list[str] = []
    handles = [
        m.register_forward_hook(lambda mod, inp, out, n=name: order.append(n)
                                if n not in order and (isinstance(mod, nn.Conv2d) or out.ndim == 4) else None)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return order


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward_small_width(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, width=SMALL)
    x = example_input(32, batch=2)
    out = model(x)
    assert out.shape == (2, 7)
    out.square().mean().backward()
    convs = conv_layers(model)
    assert all(c.weight.grad is not None for c in convs.values())
    assert classifier_name(model) not in convs


def test_imagenet_variants_forward():
    x = example_input(64, batch=2)
    for name, knobs in [
        ("resnet18", {"cifar_stem": False}),
        ("vgg16", {"head": "imagenet"}),
        ("mobilenetv2", {"cifar_strides": False}),
    ]:
        assert build_model(name, 5, width=SMALL, **knobs).eval()(x).shape == (2, 5)


@pytest.mark.parametrize("name", ["resnet18", "vgg16", "convnext_t"])
def test_width_scales_channels_exactly(name):
    a = conv_layers(build_model(name, 10, width=0.25))
    b = conv_layers(build_model(name, 10, width=0.5))
    assert list(a) == list(b)
    for key in a:
        assert out_channels(b[key]) == 2 * out_channels(a[key]), key


def test_width_scales_mobilenetv2_and_resnet_widths():
    m = build_model("mobilenetv2", 10, width=0.5)
    assert m.features[0][0].out_channels == 16  # round8(32 * 0.5)
    assert m.features[1].conv[1].out_channels == 8  # round8(16 * 0.5)
    full = conv_layers(build_model("mobilenetv2", 10, width=1.0))
    half = conv_layers(m)
    assert list(full) == list(half)
    assert sum(c.out_channels for c in half.values()) < sum(c.out_channels for c in full.values())
    r = build_model("resnet18", 10, width=SMALL)
    assert [r.layer1[0].conv1.out_channels, r.layer4[1].conv2.out_channels, r.fc.in_features] == [8, 64, 64]
    assert r.conv1.kernel_size == (3, 3) and r.conv1.stride == (1, 1) and isinstance(r.maxpool, nn.Identity)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_conv_layers_stable_and_in_forward_order(name):
    m1 = build_model(name, 10, width=SMALL)
    m2 = build_model(name, 10, width=SMALL)
    names = list(conv_layers(m1))
    assert names == list(conv_layers(m2))
    assert names == _forward_call_order(m1, example_input(32, 1))
    assert {n for n in names if isinstance(m1.get_submodule(n), nn.Conv2d)} == {
        n for n, m in m1.named_modules() if isinstance(m, nn.Conv2d)}
    assert all(m1.get_submodule(n) is c for n, c in conv_layers(m1).items())


def test_resnet18_units():
    model = build_model("resnet18", 10, width=SMALL)
    units = conv_norm_pairs(model)
    assert len(units) == 20
    assert all(isinstance(u.norm, nn.BatchNorm2d) and u.act is not None for u in units.values())
    u = units["layer1.0.conv1"]
    assert isinstance(u, ConvUnit)
    assert (u.norm_name, u.act_name, u.act_call, u.residual) == ("layer1.0.bn1", "layer1.0.relu", 0, False)
    u = units["layer1.0.conv2"]
    assert (u.norm_name, u.act_name, u.act_call, u.residual) == ("layer1.0.bn2", "layer1.0.relu", 1, True)
    u = units["layer2.0.downsample.0"]
    assert (u.norm_name, u.act_name, u.act_call, u.residual) == ("layer2.0.downsample.1", "layer2.0.relu", 1, True)
    assert units["conv1"].norm_name == "bn1" and units["conv1"].act_name == "relu"
    for _name, unit in units.items():
        assert unit.norm is model.get_submodule(unit.norm_name)
        assert unit.norm.num_features == unit.conv.out_channels


def test_resnet18_act_call_hooks_the_unit_activation():
    """The act_call-th call of the (shared) relu is relu(bn1(conv1(x))) for conv1 units."""
    model = build_model("resnet18", 10, width=SMALL).eval()
    unit = conv_norm_pairs(model)["layer2.1.conv1"]
    seen: dict[str, list[torch.Tensor]] = {"norm": [], "act": []}
    h1 = unit.norm.register_forward_hook(lambda m, i, o: seen["norm"].append(o.clone()))
    h2 = unit.act.register_forward_hook(lambda m, i, o: seen["act"].append(o.clone()))
    with torch.no_grad():
        model(example_input(32, 2))
    h1.remove()
    h2.remove()
    assert len(seen["act"]) == 2  # the block's relu runs twice
    assert torch.equal(seen["act"][unit.act_call], seen["norm"][0].clamp_min(0))


def test_vgg16_and_mobilenetv2_units():
    units = conv_norm_pairs(build_model("vgg16", 10, width=SMALL))
    assert len(units) == 13
    assert (units["features.0"].norm_name, units["features.0"].act_name) == ("features.1", "features.2")
    assert all(isinstance(u.norm, nn.BatchNorm2d) and isinstance(u.act, nn.ReLU) for u in units.values())

    model = build_model("mobilenetv2", 10, width=SMALL)
    units = conv_norm_pairs(model)
    assert len(units) == 52
    assert all(isinstance(u.norm, nn.BatchNorm2d) for u in units.values())
    dw = units["features.2.conv.1.0"]
    assert dw.depthwise and dw.norm_name == "features.2.conv.1.1" and dw.act_name == "features.2.conv.1.2"
    project = units["features.3.conv.2"]  # linear bottleneck with a residual add, no activation
    assert (project.norm_name, project.act, project.residual) == ("features.3.conv.3", None, True)
    assert units["features.18.0"].act_name == "features.18.2"
    assert len(analysable_layers(model, include_depthwise=False)) == 52 - 17


def test_convnext_units():
    model = build_model("convnext_t", 10, width=SMALL)
    units = conv_norm_pairs(model)
    assert len(units) == 1 + 18 + 3 + 2 * 18   # the pointwise Linears are units too (METHODS §1)
    stem = units["features.0.0"]
    assert stem.norm_name == "features.0.1" and stem.channel_dim == 1
    blk = units["features.1.0.block.0"]
    assert blk.depthwise and blk.norm_name == "features.1.0.block.2" and blk.channel_dim == -1
    assert isinstance(blk.norm, nn.LayerNorm) and blk.act is None  # LN feeds the pointwise Linear
    down = units["features.2.1"]
    assert down.norm is None and down.act is None
    pw1, pw2 = units["features.1.0.block.3"], units["features.1.0.block.5"]
    assert isinstance(pw1.conv, nn.Linear) and pw1.channels_last and pw1.act_name == "features.1.0.block.4"
    assert pw2.norm is None and pw2.act is None and pw2.out_channels == blk.conv.out_channels
    assert classifier_name(model) not in units


def test_functional_activation_and_untraceable_fallback(caplog):
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            x = F.relu(self.bn(self.conv(x)))
            return self.fc(x.mean((2, 3)))

    unit = conv_norm_pairs(Functional())["conv"]
    assert unit.norm_name == "bn" and unit.act_name is None and isinstance(unit.act, FunctionalAct)
    t = torch.randn(4) - 0.5
    assert torch.equal(unit.act(t), t.clamp_min(0))

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = nn.BatchNorm2d(8)
            self.relu = nn.ReLU()
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            x = self.relu(self.bn(self.conv(x)))
            if x.sum() > 0:  # torch.fx cannot trace this
                x = x * 2
            return self.fc(x.mean((2, 3)))

    with caplog.at_level(logging.ERROR, logger="axes_pipeline"):  # the fallback's warning is expected
        unit = conv_norm_pairs(DataDependent())["conv"]
    assert (unit.norm_name, unit.act_name) == ("bn", "relu")


def test_depth_spaced_layers():
    model = build_model("resnet18", 10, width=SMALL)
    picks = depth_spaced_layers(model, k=6)
    names = list(conv_layers(model))
    assert len(picks) == 6 and picks[0] == "conv1" and picks[-1] == "layer4.1.conv2"
    assert not any("downsample" in p for p in picks)
    assert [names.index(p) for p in picks] == sorted(names.index(p) for p in picks)
    assert any("downsample" in p for p in depth_spaced_layers(model, k=20, include_shortcuts=True))
    assert len(depth_spaced_layers(model, k=100)) == 17
    mb = build_model("mobilenetv2", 10, width=SMALL)
    assert len(depth_spaced_layers(mb, k=6, include_depthwise=False)) == 6
    assert not any(conv_layers(mb)[p].groups > 1 for p in depth_spaced_layers(mb, k=6, include_depthwise=False))


def test_example_input_shapes():
    assert example_input(32).shape == (1, 3, 32, 32)
    assert example_input((1, 28, 20), batch=4).shape == (4, 1, 28, 20)
    assert example_input({"image_size": 64}, batch=2).shape == (2, 3, 64, 64)
    assert example_input(OmegaConf.create({"name": "convnext_t"})).shape == (1, 3, 224, 224)
    assert example_input({"name": "resnet18", "cifar_stem": False}).shape[-1] == 224
    assert torch.equal(example_input(8), example_input(8))


def test_unknown_name_and_option():
    with pytest.raises(UserError) as err:
        build_model("resnet50", 10)
    for name in MODEL_NAMES:
        assert name in str(err.value)
    with pytest.raises(UserError, match="cifar_stem"):
        build_model("resnet18", 10, cifar_stems=True)
    with pytest.raises(UserError, match="head"):
        build_model("vgg16", 10, head="tiny")
    with pytest.raises(UserError, match="width"):
        build_model("vgg16", 10, width=0)


def test_pretrained_offline_is_one_line_naming_the_cache_file(tmp_path):
    with pytest.raises(UserError, match="model.weights=PATH") as err:
        build_model("resnet18", 10, pretrained=True)
    msg = str(err.value)
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    assert "\n" not in msg and "name resolution" in msg
    assert f"put resnet18-f37072fd.pth in {cache}" in msg          # torchvision's file name, the hub cache
    assert not list(cache.glob("*"))                                # no partial file left behind
    with pytest.raises(UserError, match="no such file"):
        build_model("resnet18", 10, pretrained=True, weights="/nonexistent/resnet18.pth")
    with pytest.raises(UserError, match="model.width=1.0 only"):   # before any download
        build_model("resnet18", 10, width=0.5, pretrained=True)


def test_dynamics_refuses_pretrained_weights():
    for kw in ({"pretrained": True}, {"weights": "/some/file.pth"}):
        with pytest.raises(UserError, match="experiment=dynamics trains from random initialisation") as err:
            build_model("resnet18", 10, width=SMALL, from_scratch=True, **kw)
        assert "\n" not in str(err.value)
    assert not hasattr(build_model("resnet18", 10, width=SMALL, from_scratch=True), "pretrained_report")


@pytest.fixture(scope="module")
def imagenet_resnet18_file(tmp_path_factory) -> Path:
    """A state_dict in torchvision's ImageNet layout (random values: nothing is downloaded)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), path)
    return path


def test_weights_file_loads_and_skips_classifier_and_stem(imagenet_resnet18_file):
    ref = torch.load(imagenet_resnet18_file, weights_only=True)
    model = build_model("resnet18", 10, weights=str(imagenet_resnet18_file))  # weights implies pretrained
    report = model.pretrained_report
    assert torch.equal(model.layer1[0].conv1.weight, ref["layer1.0.conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, ref["layer4.1.bn2.running_var"])
    assert set(report.skipped_classifier) == {"fc.weight", "fc.bias"}
    assert [k for k, _, _ in report.skipped_shape] == ["conv1.weight"]  # the CIFAR 3×3 stem
    assert "conv1.weight" in report.missing and "layer1.0.conv1.weight" in report.loaded
    assert model.fc.out_features == 10
    # ImageNet stem: everything but the classifier fits
    full = build_model("resnet18", 10, pretrained=True, weights=str(imagenet_resnet18_file), cifar_stem=False)
    assert full.pretrained_report.skipped_shape == [] and torch.equal(full.conv1.weight, ref["conv1.weight"])


def test_weights_wrapped_state_dict_and_misfit(imagenet_resnet18_file, tmp_path):
    ref = torch.load(imagenet_resnet18_file, weights_only=True)
    wrapped = tmp_path / "lightning_style.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in ref.items()}, "epoch": 3}, wrapped)
    model = build_model("resnet18", 10, pretrained=True, weights=str(wrapped))
    assert torch.equal(model.layer3[0].downsample[0].weight, ref["layer3.0.downsample.0.weight"])
    with pytest.raises(UserError, match="width=1.0"):
        build_model("resnet18", 10, width=0.25, pretrained=True, weights=str(imagenet_resnet18_file))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="state_dict"):
        build_model("resnet18", 10, weights=str(junk))


def test_hub_cache_is_used_when_present(imagenet_resnet18_file, tmp_path, monkeypatch):
    home = tmp_path / "cached_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    (home / "hub" / "checkpoints" / imagenet_resnet18_file.name).write_bytes(imagenet_resnet18_file.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(home))
    model = build_model("resnet18", 10, pretrained=True, cifar_stem=False)
    assert model.pretrained_report.path.endswith(imagenet_resnet18_file.name)
    assert build_model("resnet18", 10, weights="IMAGENET1K_V1").pretrained_report.loaded
    # from the cache, never the network (the autouse fixture makes any download fail)


def test_pretrained_downloads_into_the_hub_cache_on_first_use(imagenet_resnet18_file, tmp_path, monkeypatch):
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):   # torch.hub's signature
        calls.append((url, Path(dst).name, hash_prefix))
        Path(dst).write_bytes(imagenet_resnet18_file.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model = build_model("resnet18", 10, pretrained=True, cifar_stem=False)
    assert calls == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", "resnet18-f37072fd.pth", "f37072fd")]
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert model.pretrained_report.path == str(cached) and cached.is_file()
    build_model("resnet18", 10, pretrained=True)                   # second use: read from the cache
    assert len(calls) == 1


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_hydra_config_builds(name, tmp_path):
    from hydra.utils import instantiate

    from .helpers import make_cfg

    cfg = make_cfg("train", [f"model={name}"], tmp_path).model   # the YAML over its typed schema
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    keys = set(cfg) - {"_target_", "_partial_", "name", "width", "pretrained", "weights", "recipe", "from_scratch"}
    assert keys == set(model_knobs(name)), "config knobs and build_model knobs differ"
    assert cfg.name == name and cfg.pretrained is False and cfg.weights is None
    cfg.width = SMALL
    del cfg["recipe"]  # the optimizer's, not the model's
    factory = instantiate(cfg)
    assert isinstance(factory, functools.partial)
    assert factory(num_classes=3)(example_input(32, 1)).shape == (1, 3)


# fvcore counts one "flop" per multiply-add (MACs); reference values from FIELD_NOTES (10 classes).
REFERENCE_MACS = {
    ("resnet18", ()): 556.7e6,
    ("vgg16", ()): 313.8e6,
    ("mobilenetv2", ()): 91.3e6,  # cifar_strides=True (the default) gives this figure
    ("convnext_t", ()): 91.2e6,
    ("mobilenetv2", (("cifar_strides", False),)): None,  # torchvision strides: printed only
    # torchvision's classifier at 32x32 (experiment=cifar100_vgg16): the 1x1 map pooled to 7x7 feeds
    # Linear(512·49, 4096) + Linear(4096, 4096): 313.8 M + 119.6 M.
    ("vgg16", (("head", "imagenet"),)): 433.4e6,
}


def test_fvcore_macs_full_width_32px(capsys):
    fvcore = pytest.importorskip("fvcore.nn")
    lines = []
    for (name, knobs), expected in REFERENCE_MACS.items():
        model = build_model(name, 10, **dict(knobs)).eval()
        flops = fvcore.FlopCountAnalysis(model, example_input(32))
        flops.unsupported_ops_warnings(False)
        flops.uncalled_modules_warnings(False)
        macs = flops.total()
        lines.append(f"{name} {dict(knobs)}: {macs / 1e6:.1f} M MACs at 32x32")
        if expected is not None:
            assert macs == pytest.approx(expected, rel=0.01), lines[-1]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
