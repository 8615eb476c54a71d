"""ConvNeXt's pointwise convs are ``nn.Linear`` layers applied channels-last (issue 20 item 1,
METHODS §1): they are analysable units (capture, gradient patches, scores), linked by the
propagation analysis and pruned as coupled groups, and the classifier never is a unit. Their
lesions: ``tests/test_families.py::test_batched_lesions_equal_the_weight_path_on_general_graphs``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision.ops import Permute

from axes_pipeline.models import build_model, conv_norm_pairs

SIDE = 32          # the family test's input side (REPRESENTATIVES["ConvNeXt"])
WIDTH = 0.125


@pytest.fixture(scope="module")
def convnext():
    torch.manual_seed(0)
    return build_model("tv_convnext_tiny", 10, width=WIDTH).eval()


class _Block(nn.Module):
    """A ConvNeXt block in miniature, its pointwise convs spelled as ``Linear`` (channels-last,
    torchvision's layout) or, with ``conv=True``, as 1×1 ``Conv2d`` on ``[B, C, H, W]``. Same module
    names either way, so a capture draws the same positions for both."""

    def __init__(self, conv: bool, c: int = 6, hidden: int = 12):
        super().__init__()
        self.conv = conv
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.ln = nn.LayerNorm(c)
        self.pw1 = nn.Conv2d(c, hidden, 1) if conv else nn.Linear(c, hidden)
        self.act = nn.GELU()
        self.pw2 = nn.Conv2d(hidden, c, 1) if conv else nn.Linear(hidden, c)
        self.to_last, self.to_first = Permute([0, 2, 3, 1]), Permute([0, 3, 1, 2])
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        y = self.ln(self.to_last(self.dw(x)))
        if self.conv:   # the 1×1 convs read [B, C, H, W]
            y = self.to_last(self.pw2(self.act(self.pw1(self.to_first(y)))))
        else:
            y = self.pw2(self.act(self.pw1(y)))
        return self.head(self.to_first(y).mean((2, 3)))

    def copy_to_conv(self) -> _Block:
        twin = _Block(conv=True, c=self.dw.in_channels, hidden=self.pw1.out_features).eval()
        twin.load_state_dict({k: v[:, :, None, None] if k in ("pw1.weight", "pw2.weight") else v
                              for k, v in self.state_dict().items()})
        return twin


def test_linear_units_on_convnext_tiny(convnext):
    units = conv_norm_pairs(convnext)
    linear = [n for n, u in units.items() if u.channels_last]
    dw = [n for n, u in units.items() if u.depthwise]
    # stem + 18 depthwise + 3 downsampling convs + 2 × 18 pointwise Linears
    assert len(units) == 1 + 18 + 3 + 2 * 18 and len(linear) == 36 and len(dw) == 18
    assert "classifier.2" not in units                                     # the head is never a unit
    pw1, pw2 = units["features.1.0.block.3"], units["features.1.0.block.5"]
    assert pw1.out_channels == 4 * pw2.out_channels == 4 * pw1.in_channels
    assert pw1.act_name == "features.1.0.block.4" and pw1.norm is None and pw2.act is None
    assert pw1.weight.shape == (pw1.out_channels, pw1.in_channels, 1, 1) and pw1.kernel_size == (1, 1)


@pytest.mark.parametrize("arch,width", [("resnet18", 0.25), ("vgg11", 0.125), ("mobilenet_v2", 0.25)])
def test_other_backbones_have_no_linear_units(arch, width):
    """VGG's classifier MLP reads a flattened vector: no Linear there is a unit."""
    units = conv_norm_pairs(build_model(f"tv_{arch}", 10, width=width))
    assert units and not any(u.channels_last for u in units.values())
    assert all(isinstance(u.conv, nn.Conv2d) for u in units.values())


def test_linear_capture_equals_the_1x1_conv_oracle():
    """A Linear unit's samples, gradient patches and axes equal those of a 1×1 Conv2d with its weights."""
    from axes_pipeline.axes.table import analyze_capture
    from axes_pipeline.capture import capture_activations
    from tests.reference.families import axes_knobs

    torch.manual_seed(0)
    lin = _Block(conv=False).eval()
    conv = lin.copy_to_conv()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, 5, 7, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    with torch.no_grad():
        assert torch.allclose(lin(data[0][0]), conv(data[0][0]), atol=1e-5)
    ul, uc = conv_norm_pairs(lin), conv_norm_pairs(conv)
    assert list(ul) == list(uc) == ["dw", "pw1", "pw2"]
    assert ul["pw1"].channels_last and not uc["pw1"].channels_last
    knobs = axes_knobs(gradients=True)
    caps = {}
    for key, model, units in (("lin", lin, ul), ("conv", conv, uc)):
        for point in ("pre_bn", "post_act"):
            caps[key, point] = capture_activations(model, units, data, point=point, samples_per_image=4,
                                                   patch_moments=True, progress=False, keep_samples=True)
    for point in ("pre_bn", "post_act"):
        for layer in ("pw1", "pw2"):
            a, b = caps["lin", point].acts[layer], caps["conv", point].acts[layer]
            assert a.shape == b.shape == (24 * 4, ul[layer].out_channels)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    axes = {k: analyze_capture(caps[k, "pre_bn"], u, knobs, torch.device("cpu"), progress=False)[0]
            for k, u in (("lin", ul), ("conv", uc))}
    for col in ("input_capture", "task_info", "peer_overlap", "grad_cos_euclid"):
        np.testing.assert_allclose(axes["lin"][col].to_numpy(), axes["conv"][col].to_numpy(), atol=1e-4, err_msg=col)
    assert np.isfinite(axes["lin"].loc[axes["lin"].layer == "pw1", "grad_cos_euclid"]).all()


def test_propagation_links_the_pointwise_convs(convnext):
    from axes_pipeline.analyses.propagation import link_report

    links, refused = link_report(convnext)
    pairs = {(u, d) for u, d, _ in links}
    assert ("features.1.0.block.0", "features.1.0.block.3") in pairs      # depthwise → pwconv1
    assert ("features.1.0.block.3", "features.1.0.block.5") in pairs      # pwconv1 → pwconv2
    assert ("features.1.2.block.5", "features.2.1") in pairs              # through the layer scale and the add
    # 18 blocks × 2 + 3 downsampling convs; the depthwise receivers are refused with their reason
    assert len(pairs) == 39 and len(refused) == 18
    assert all("grouped/depthwise receiver" in r for _, r in refused)


def test_pruning_the_hidden_group_matches_fvcore(convnext):
    from axes_pipeline.pruning import CostModel, build_groups, full_keep, fvcore_macs, prune_physically

    x = torch.randn(1, 3, SIDE, SIDE)
    groups = build_groups(convnext, x)
    hidden = [g for g in groups.groups if g.name.endswith("block.3")]
    assert len(hidden) == 18 and not groups.frozen and not groups.refused
    keep = full_keep(groups)
    gi = [g.name for g in groups.groups].index("features.3.1.block.3")
    keep[gi][::2] = False                                                  # half of one block's hidden units
    cost = CostModel.build(convnext, groups, x)
    pruned, _ = prune_physically(convnext, groups, keep, x)
    blk = pruned.features[3][1].block
    assert blk[3].out_features == blk[5].in_features == groups.groups[gi].size // 2
    with torch.no_grad():
        out = pruned(torch.randn(2, 3, SIDE, SIDE))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert fvcore_macs(pruned, x)[0] == cost.macs(keep) < cost.total    # the MAC model is exact


def test_channels_last_hook_is_not_fooled_by_a_square_map():
    """H == C: the layout comes from the unit, not from the tensor's shape."""
    from axes_pipeline.capture import capture_activations

    torch.manual_seed(0)
    lin = _Block(conv=False, c=6, hidden=6).eval()
    conv = lin.copy_to_conv()
    data = [(torch.randn(4, 6, 6, 6), torch.randint(0, 3, (4,)))]
    a = capture_activations(lin, conv_norm_pairs(lin), data, samples_per_image=4, progress=False, keep_samples=True).acts["pw1"]
    b = capture_activations(conv, conv_norm_pairs(conv), data, samples_per_image=4, progress=False, keep_samples=True).acts["pw1"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_scores_of_a_linear_unit_equal_the_1x1_conv_oracle():
    """Weight scores and feature-map scores (hrank, chip: hooks on the unit's own output, channels
    last) give a Linear unit the values of a 1×1 Conv2d with its weights."""
    from axes_pipeline.models import conv_layers
    from axes_pipeline.pruning import ScoreContext, resolve_score

    torch.manual_seed(0)
    lin = _Block(conv=False).eval()
    conv = lin.copy_to_conv()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 6, 5, 7, generator=g), torch.randint(0, 3, (4,), generator=g))]
    for name in ("l1", "taylor", "hrank", "chip"):
        got = [resolve_score(name)(ScoreContext(m, conv_layers(m), calibration=lambda: batches, seed=0), 0)
               for m in (lin, conv)]
        for layer in ("pw1", "pw2"):
            assert got[0][layer].shape == (lin.get_submodule(layer).out_features,)
            np.testing.assert_allclose(got[0][layer], got[1][layer], rtol=1e-4, atol=1e-5, err_msg=f"{name} {layer}")
