"""The one torch.fx graph module (models/graph.py): conv units and their norms, residual adds in
every spelling, the cross-layer links of propagation through adds, concatenations and SE
products, and the lesion engine's prefix/suffix split, which composes to the full forward exactly."""

from __future__ import annotations

import logging
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from axes_pipeline.analyses.lesion_engine import LesionEngine
from axes_pipeline.analyses.propagation import conv_links, link_report
from axes_pipeline.models import build_model
from axes_pipeline.models.graph import FunctionalAct, conv_graph, conv_sources, is_add, split, trace


class Toy(nn.Module):
    """stem → block (``out += x``) → two convs concatenated → GroupNorm → SE product →
    ``torch.add`` residual → depthwise with ``operator.add`` → pointwise."""

    class Scale(nn.Module):  # a user's module without children: one graph node
        def forward(self, x):
            return x * 2.0

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.a1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.abn1 = nn.BatchNorm2d(8)
        self.a2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.abn2 = nn.BatchNorm2d(8)
        self.b1 = nn.Conv2d(8, 6, 1)
        self.b2 = nn.Conv2d(8, 4, 3, padding=1)
        self.c = nn.Conv2d(10, 8, 1)
        self.cbn = nn.GroupNorm(2, 8)
        self.se_fc = nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(8, 8, 3, padding=1)
        self.dbn = nn.BatchNorm2d(8)
        self.scale = Toy.Scale()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.e = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        out = F.relu(self.abn1(self.a1(x)))
        out = self.abn2(self.a2(out))
        out += x
        x = torch.relu(out)
        x = torch.cat([self.b1(x), F.relu(self.b2(x))], 1)
        x = F.gelu(self.cbn(self.c(x)))
        x = x * torch.sigmoid(self.se_fc(F.adaptive_avg_pool2d(x, 1)))
        x = torch.add(self.dbn(self.d(x)), x).relu()
        x = operator.add(self.dw(self.scale(x)), x)
        x = F.relu6(self.e(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_units_norms_activations_and_residual_adds():
    model = Toy().eval()
    g = conv_graph(model, _convs(model))
    assert list(g.units) == ["stem", "a1", "a2", "b1", "b2", "c", "se_fc", "d", "dw", "e"]
    u = g.units
    assert (u["stem"].norm_name, u["a1"].norm_name, u["c"].norm_name, u["d"].norm_name) == ("bn0", "abn1", "cbn", "dbn")
    assert all(u[n].norm is None for n in ("b1", "b2", "se_fc", "dw", "e"))
    # `out += x` and `torch.add(...)` are residual adds; the activation after them is the unit's
    assert u["a2"].residual and u["d"].residual and not u["a1"].residual
    assert u["a2"].act.fn is F.relu and u["d"].act.fn is F.relu        # torch.relu(out), (...).relu()
    assert isinstance(u["c"].act, FunctionalAct) and u["c"].act.fn is F.gelu and u["c"].act_name is None
    assert u["b1"].act is None and u["b2"].act.fn is F.relu and u["e"].act.fn is F.relu6
    assert u["dw"].depthwise and g.shortcuts == {"b1"}     # 1×1 beside the 3×3 b2 on the same input


def test_is_add_knows_every_spelling():
    class Adds(nn.Module):
        def forward(self, x):
            a = x + 1
            a += x
            b = torch.add(a, x)
            return operator.add(b.add(x).add_(x), x)

    graph = trace(Adds())
    assert sum(is_add(n) for n in graph.nodes) == 6 and not is_add(None)


def test_links_through_adds_concatenations_and_se_products():
    model = Toy().eval()
    graph = trace(model)
    main = dict(conv_sources(model, graph, _convs(model), "main"))
    assert main["stem"] is None                                   # reads the network input
    assert main["a1"] == [("stem", 0, 8)]
    assert main["b1"] == main["b2"] == [("a2", 0, 8)]             # behind `out += x`: the main branch
    assert main["c"] == [("b1", 0, 6), ("b2", 6, 4)]              # concatenation: channel offsets
    assert main["se_fc"] == [("c", 0, 8)]                         # through pooling and GELU
    assert main["d"] == [("c", 0, 8)]                             # through x * sigmoid(gate)
    assert main["dw"] == "an op that mixes or reshapes channels (scale)"   # a user's module: unknown
    assert main["e"] == [("dw", 0, 8)]                            # operator.add: the branch with a conv
    skip = dict(conv_sources(model, graph, _convs(model), "skip"))
    assert skip["b1"] == "a residual add joins two branches (propagation.residual=skip)"
    assert skip["a1"] == main["a1"] and skip["c"] == main["c"]


def test_resnet18_links_cross_each_block_add_to_its_main_branch():
    model = build_model("resnet18", 10, width=0.125).eval()
    links = conv_links(model)
    assert len(links) == 19 and len(conv_links(model, residual="skip")) == 9
    assert ("layer1.0.conv2", "layer1.1.conv1") in links and ("layer1.1.conv2", "layer2.0.downsample.0") in links
    assert not any("downsample" in up for up, _ in links)


@pytest.mark.parametrize("make", [Toy, lambda: build_model("resnet18", 10, width=0.125),
                                  lambda: build_model("convnext_t", 10, width=0.125)])
def test_prefix_then_suffix_is_the_full_forward_exactly(make):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 3, 32, 32)
    graph = trace(model)
    with torch.no_grad():
        full = model(x)
        for name, conv in list(_convs(model).items())[::3]:
            seen = []
            handle = conv.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.clone()))
            prefix, suffix = split(model, graph, name)
            cut = prefix(x)
            handle.remove()
            assert torch.equal(cut[suffix.cut_index], seen[0]), name   # the cut carries the conv output
            assert torch.equal(suffix(*cut), full), name


def test_split_refuses_a_conv_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(self.conv(x)).mean((2, 3))

    model = Twice()
    assert split(model, trace(model), "conv") is None


def test_untraceable_network_falls_back_on_module_order(caplog):
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = nn.BatchNorm2d(8)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(8, 8, 1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            x = self.relu(self.bn(self.conv(x)))
            if x.sum() > 0:
                x = x * 2
            return self.fc(self.conv2(x).mean((2, 3)))

    model = DataDependent()
    with caplog.at_level(logging.WARNING, logger="axes_pipeline"):
        assert trace(model) is None
        g = conv_graph(model, _convs(model))
        links, refused = link_report(model, g.units)                     # consecutive layers
        engine = LesionEngine(model.eval(), g.units["conv"])              # repeats the input per lesion
    assert "could not trace DataDependent" in caplog.text
    assert list(g.units) == ["conv", "conv2"]
    assert (g.units["conv"].norm_name, g.units["conv"].act_name) == ("bn", "relu")
    assert (links, refused) == ([("conv", "conv2", 0)], []) and not engine.batched_prefix
