"""Allocations and normalisations (METHODS §9): the normalisers against Torch-Pruning's and a hand
computation, knapsack against a brute force, hybrid's count sources, the sensitivity allocation,
Torch-Pruning importances as scores, the parameter ranges of the score families, bad knobs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

from axes_pipeline.errors import UserError
from axes_pipeline.models import conv_layers
from axes_pipeline.pruning.allocation import (
    CountSource,
    group_scores,
    keep_masks,
    make_allocation,
    match_flops,
    sensitivity_keys,
)
from axes_pipeline.pruning.flops import CostModel
from axes_pipeline.pruning.groups import ChannelGroup, GroupSet, build_groups
from axes_pipeline.pruning.resolved import PruneSettings
from axes_pipeline.pruning.scores import SCORES, ScoreContext, lamp, normalize, resolve_score
from axes_pipeline.pruning.sensitivity import cached_scan, sensitivity_scan
from axes_pipeline.pruning.settings import ALLOCATIONS, NORMALIZERS, PruningConfig


# ---------------------------------------------------------------------------------- tiny synthetic layer sets
def _groups(sizes) -> GroupSet:
    gs = [ChannelGroup(f"g{i}", n, [], [f"g{i}"], [], {f"g{i}": np.arange(n)}) for i, n in enumerate(sizes)]
    return GroupSet(gs, "fc", (1, 3, 8, 8))


def _additive_cost(sizes, per_channel, const=0) -> CostModel:
    """MACs = const + Σ_g per_channel[g] · kept_g (every channel of a group costs the same)."""
    G = len(sizes)
    coef = np.array(list(per_channel) + [const], dtype=np.int64)
    a = np.array(list(range(G)) + [G], dtype=np.int64)
    b = np.full(G + 1, G, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int((coef[:G] * sizes).sum() + const)
    return CostModel(coef, a, b, sizes, total, {}, {})


def _chain_cost(sizes, c_in=3, c_out=10, spatial=4) -> CostModel:
    """A plain chain of convs: MACs = s·(c_in·k0 + Σ k_g·k_{g+1} + k_last·c_out) (bilinear)."""
    G = len(sizes)
    coef, a, b = [spatial * c_in], [0], [G]
    for g in range(G - 1):
        coef.append(spatial)
        a.append(g)
        b.append(g + 1)
    coef.append(c_out)
    a.append(G - 1)
    b.append(G)
    sizes = np.asarray(sizes, dtype=np.int64)
    m = CostModel(np.array(coef, dtype=np.int64), np.array(a), np.array(b), sizes, 0, {}, {})
    m.total = int(m.macs_counts(sizes))
    return m


# ---------------------------------------------------------------------------------- normalisers
def _tp_normalize(x: np.ndarray, how: str, dtype=torch.float64) -> np.ndarray:
    from torch_pruning.pruner.importance import GroupMagnitudeImportance

    return GroupMagnitudeImportance()._normalize(torch.tensor(x, dtype=dtype), how).double().numpy()


@pytest.mark.parametrize("how", ["mean", "max"])
def test_mean_and_max_equal_torch_prunings_normalisers(how):
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.random(17) * 3
        assert np.allclose(normalize(x, how), _tp_normalize(x, how), rtol=1e-12)


def test_lamp_equals_torch_prunings_on_the_squared_scores_and_a_hand_computation():
    # hand computation: s = [3, 1, 2] -> squares [9, 1, 4]; ascending 1, 4, 9
    # 1/(1+4+9) = 1/14, 4/(4+9) = 4/13, 9/9 = 1
    assert np.allclose(lamp(np.array([3.0, 1.0, 2.0])), [1.0, 1 / 14, 4 / 13])
    assert np.allclose(normalize(np.array([3.0, 1.0, 2.0]), "lamp"), [1.0, 1 / 14, 4 / 13])
    rng = np.random.default_rng(1)
    for _ in range(5):
        s = rng.random(23) + 0.01
        # Torch-Pruning's LAMP (float32 only) divides x_i by Σ_{j ≥ i} x_j of its already squared (p = 2) magnitudes
        assert np.allclose(normalize(s, "lamp"), _tp_normalize(s ** 2, "lamp", torch.float32), rtol=1e-5)


def test_minmax_is_the_default_and_unchanged():
    x = np.array([2.0, 5.0, 3.0, np.nan])
    assert np.allclose(normalize(x), [0.0, 1.0, 1 / 3, 0.0])
    assert PruningConfig().normalize == "minmax" and NORMALIZERS[0] == "minmax"


def test_negative_scores_are_shifted_so_the_order_is_kept():
    x = np.array([-3.0, -1.0, -2.0, 0.5])
    for how in NORMALIZERS:
        y = normalize(x, how)
        assert list(np.argsort(y)) == list(np.argsort(x)), how
        assert (y >= 0).all()


def test_group_scores_use_the_chosen_normaliser():
    groups = _groups([3, 4])
    per_layer = {"g0": np.array([1.0, 2.0, 4.0]), "g1": np.array([1.0, 1.0, 2.0, 3.0])}
    gs = group_scores(groups, per_layer, how="max")
    assert np.allclose(gs[0], [0.25, 0.5, 1.0]) and np.allclose(gs[1], [1 / 3, 1 / 3, 2 / 3, 1.0])
    dead = {"g0": np.array([False, True, False]), "g1": np.zeros(4, dtype=bool)}
    gs = group_scores(groups, per_layer, dead=dead, how="lamp")
    assert gs[0][1] < 0 and np.isclose(gs[0][2], 1.0)   # dead first, the layer's largest live value is 1


# ---------------------------------------------------------------------------------- knapsack
def _best_kept(scores, cost: CostModel, budget: int, caps) -> float:
    """Brute force: the largest summed score of the kept channels with MACs ≤ budget (each group keeps
    at least size − cap channels)."""
    best = -np.inf
    sizes = [s.size for s in scores]
    for masks in itertools.product(*[itertools.product([0, 1], repeat=n) for n in sizes]):
        kept = np.array([sum(m) for m in masks])
        if ((np.array(sizes) - kept) > caps).any() or cost.macs_counts(kept) > budget:
            continue
        best = max(best, sum(float(np.dot(m, s)) for m, s in zip(masks, scores)))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knapsack_is_within_one_channel_of_the_brute_force_best(seed):
    rng = np.random.default_rng(seed)
    sizes = [3, 4, 4]
    groups = _groups(sizes)
    cost = _additive_cost(sizes, rng.integers(1, 20, len(sizes)))
    scores = [rng.random(n) for n in sizes]
    alloc = make_allocation("knapsack", groups, scores, 0.8, cost=cost)
    for target in (0.8, 0.6, 0.45):
        res = match_flops(alloc, cost, target, 0.005)
        keep = keep_masks(alloc, res.counts)
        got = sum(float(s[k].sum()) for s, k in zip(scores, keep))
        budget = int(np.floor((target + 0.005) * cost.total))
        best = _best_kept(scores, cost, max(budget, res.macs), alloc.caps)
        assert res.macs <= max(budget, res.macs)
        # Dantzig's bound: the greedy's kept score + the value of one channel ≥ the optimum
        assert got <= best + 1e-12 and got + max(float(s.max()) for s in scores) >= best - 1e-12, (target, got, best)


def test_knapsack_prefers_cheap_channels_at_equal_score():
    sizes = [4, 4]
    groups = _groups(sizes)
    cost = _additive_cost(sizes, [1, 10])
    scores = [np.full(4, 0.5), np.full(4, 0.5)]
    alloc = make_allocation("knapsack", groups, scores, 0.9, cost=cost)
    assert (alloc.counts(2) == [0, 2]).all()   # the expensive group's channels save the most MACs per score


def test_knapsack_on_a_bilinear_chain_is_flops_matched_and_capped():
    rng = np.random.default_rng(3)
    sizes = [8, 16, 16, 32]
    groups = _groups(sizes)
    cost = _chain_cost(sizes)
    scores = [rng.random(n) for n in sizes]
    alloc = make_allocation("knapsack", groups, scores, 0.9, cost=cost)
    for t in (0.9, 0.7, 0.5, 0.3):   # one channel here costs up to 5% of the MACs: a window that wide
        res = match_flops(alloc, cost, t, 0.03)
        assert res.matched and abs(res.frac - t) <= 0.03
        assert (res.counts <= np.floor(0.9 * np.array(sizes))).all()
        for s, k in zip(scores, keep_masks(alloc, res.counts)):   # lowest score first inside a group
            if (~k).any() and k.any():
                assert s[~k].max() <= s[k].min()


# ---------------------------------------------------------------------------------- hybrid, sensitivity
def test_hybrid_takes_its_counts_from_the_source_and_its_ranking_from_the_score():
    rng = np.random.default_rng(4)
    sizes = [6, 8, 10]
    groups = _groups(sizes)
    mine = [rng.random(n) for n in sizes]
    other = [rng.random(n) for n in sizes]
    hyb = make_allocation("hybrid", groups, mine, 0.9, counts_from=CountSource("score", other))
    ref = make_allocation("global", groups, other, 0.9)
    for i in (3, 7, 12):
        assert (hyb.counts(i) == ref.counts(i)).all()
        for s, k in zip(mine, keep_masks(hyb, hyb.counts(i))):
            if (~k).any() and k.any():
                assert s[~k].max() <= s[k].min()
    uni = make_allocation("hybrid", groups, mine, 0.9, counts_from=CountSource("uniform"))
    ref = make_allocation("uniform", groups, mine, 0.9)
    assert all((uni.counts(i) == ref.counts(i)).all() for i in range(ref.n_params + 1))


def test_sensitivity_keys_prune_the_least_sensitive_layer_most():
    sizes = np.array([8, 8])
    # layer 0 loses 0.3 at a quarter of its channels, layer 1 nothing until three quarters
    keys = sensitivity_keys(sizes, [0.25, 0.5, 0.75], np.array([[0.3, 0.5, 0.8], [0.0, 0.0, 0.1]]))
    assert np.allclose(keys[0][:2], [0.15, 0.3]) and np.allclose(keys[1][:4], 0.0)
    assert all((np.diff(k) >= 0).all() for k in keys)
    groups = _groups(sizes)
    scores = [np.arange(8.0), np.arange(8.0)]
    alloc = make_allocation("sensitivity", groups, scores, 0.9,
                            counts_from=CountSource("sensitivity", keys))
    c = alloc.counts(6)
    assert c[1] == 6 and c[0] == 0


def test_the_scan_prunes_one_layer_at_a_time_and_is_cached(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    groups = build_groups(model, x)
    ranking = [np.arange(g.size, dtype=float) for g in groups.groups]
    seen = []

    def val_acc(m):
        # the masked network's output zeroes the removed channels: count them as the "accuracy"
        with torch.no_grad():
            h = m[:3](x)
        seen.append(int((h.abs().sum((0, 2, 3)) == 0).sum()))
        return 1.0 - 0.1 * seen[-1]

    base, drops = sensitivity_scan(model, groups, ranking, [0.25, 0.5], val_acc)
    assert base == 1.0 and drops.shape == (2, 2)
    assert np.allclose(drops[0], [0.1, 0.2]) and np.allclose(drops[1], 0.0)   # layer 1 alone leaves layer 0 whole
    calls = []
    key = {"k": 1}
    first = cached_scan(tmp_path / "s.json", key, lambda: (calls.append(1), (base, drops))[1], groups, [0.25, 0.5])
    again = cached_scan(tmp_path / "s.json", key, lambda: (calls.append(1), (base, drops))[1], groups, [0.25, 0.5])
    assert calls == [1] and np.allclose(first, again)


# ---------------------------------------------------------------------------------- settings, bad knobs
def _settings(**kw):
    return PruneSettings(PruningConfig(**kw), "resnet18", 0, progress=False)


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_every_allocation_name_is_accepted_with_a_cap(allocation):
    s = _settings(allocation=allocation)
    assert s.allocation == allocation and 0 < s.max_fraction < 1


@pytest.mark.parametrize("kw,match", [
    ({"allocation": "greedy"}, r"allocation \(pruning.allocation\) 'greedy'.*knapsack.*sensitivity"),
    ({"normalize": "zscore"}, r"pruning.normalize.*lamp"),
    ({"hybrid_counts_from": "nosuch"}, r"score \(pruning.hybrid_counts_from\) 'nosuch'.*sensitivity.*uniform"),
    ({"hybrid_counts_from": "ixy_minus_red_b-1"}, r"'ixy_minus_red_b-1' \(pruning.hybrid_counts_from\): β must be ≥ 0"),
    ({"sensitivity_fractions": [0.5, 1.0]}, r"pruning.sensitivity_fractions: 1.0"),
    ({"sensitivity_fractions": []}, r"pruning.sensitivity_fractions is empty"),
    ({"scores": ["ixy_minus_red_b-5"]}, r"'ixy_minus_red_b-5' \(pruning.scores\): β must be ≥ 0"),
    ({"scores": ["magnitude_plus_ix_a-0.5"]}, r"'magnitude_plus_ix_a-0.5' \(pruning.scores\): α must be ≥ 0"),
    ({"scores": ["two_axis_a1_b-1"]}, r"'two_axis_a1_b-1' \(pruning.scores\): β must be ≥ 0"),
    ({"scores": ["tp.NoSuchImportance"]}, r"tp.NoSuchImportance.*tp.MagnitudeImportance"),
    ({"scores": ["tp.HessianImportance"]}, r"per-sample gradients"),
])
def test_bad_allocation_knobs_are_one_line(kw, match):
    with pytest.raises(UserError, match=match) as err:
        _settings(**kw)
    assert "\n" not in str(err.value)


def test_hybrid_source_names_its_knob_not_pruning_scores():
    with pytest.raises(UserError) as err:
        _settings(allocation="hybrid", hybrid_counts_from="tayler")
    assert "pruning.hybrid_counts_from" in str(err.value) and "(pruning.scores)" not in str(err.value)


def test_family_parameters_at_the_edge_are_accepted():
    assert resolve_score("ixy_minus_red_b0").param == 0.0 and resolve_score("two_axis_a1_b2.5").param == 2.5


def test_count_sources_resolve():
    assert _settings(allocation="hybrid", hybrid_counts_from="uniform").counts_source == "uniform"
    assert _settings(allocation="sensitivity").needs_scan
    assert _settings(allocation="hybrid").counts_source.name == "taylor"
    assert _settings(allocation="global").counts_source is None


# ---------------------------------------------------------------------------------- Torch-Pruning importances
@pytest.fixture(scope="module")
def chain():
    """A plain conv chain (every group one conv and its BN) with trained-looking BN and data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(-1.5, 1.5)
    model.eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(2)]
    ctx = ScoreContext(model, conv_layers(model), calibration=lambda: batches, example=torch.randn(1, 3, 8, 8))
    return model, ctx


def _tp(ctx, importance):
    from axes_pipeline.pruning.scores import importance_score

    return importance_score("tp.probe", importance)(ctx, 0)


def test_tp_magnitude_bn_and_taylor_equal_ours_on_the_root_conv(chain):
    import torch_pruning as tp

    _model, ctx = chain
    ours = {n: SCORES[n](ctx, 0) for n in ("l1", "l2", "bn_scale", "taylor")}
    # group_reduction="first": the root conv's own filters, as ours (the default "mean" also averages the
    # BN's |γ|^p and the next conv's input weights into the group)
    l1 = _tp(ctx, tp.importance.MagnitudeImportance(p=1, normalizer=None, group_reduction="first"))
    l2sq = _tp(ctx, tp.importance.MagnitudeImportance(p=2, normalizer=None, group_reduction="first"))
    bn = _tp(ctx, tp.importance.BNScaleImportance(normalizer=None))
    taylor = _tp(ctx, tp.importance.TaylorImportance(normalizer=None, group_reduction="first"))
    for layer in ctx.layers:
        assert np.allclose(l1[layer], ours["l1"][layer], rtol=1e-5)
        assert np.allclose(np.sqrt(l2sq[layer]), ours["l2"][layer], rtol=1e-5)   # theirs is Σw², ours ‖w‖₂
        assert np.allclose(bn[layer], ours["bn_scale"][layer], rtol=1e-5)
        assert np.allclose(taylor[layer], ours["taylor"][layer], rtol=1e-4)
    # the network is left as it was: no gradients, requires_grad unchanged
    assert all(p.grad is None and p.requires_grad for p in ctx.model.parameters())


def test_tp_fpgm_differs_from_ours_by_its_absolute_value(chain):
    """Torch-Pruning's FPGM measures distances between |w|^p, not between the filters (He et al. 2019, and
    ours): equal on filters with non-negative weights, different otherwise."""
    import torch_pruning as tp

    model, ctx = chain
    theirs = _tp(ctx, tp.importance.FPGMImportance(p=1, normalizer=None, group_reduction="first"))
    conv = model[3]
    saved = conv.weight.data.clone()
    try:
        conv.weight.data.abs_()
        same = _tp(ctx, tp.importance.FPGMImportance(p=1, normalizer=None, group_reduction="first"))["3"]
        assert np.allclose(same, SCORES["fpgm"](ctx, 0)["3"], rtol=1e-5)
    finally:
        conv.weight.data.copy_(saved)
    assert not np.allclose(theirs["3"], SCORES["fpgm"](ctx, 0)["3"], rtol=1e-3)


def test_tp_class_names_resolve_to_baseline_scores(chain):
    _model, ctx = chain
    s = resolve_score("tp.MagnitudeImportance")
    assert s.axis == "baseline" and s.name == "tp.MagnitudeImportance" and not s.needs
    assert resolve_score("tp.TaylorImportance").needs == frozenset({"calibration"})
    v = s(ctx, 0)
    assert set(v) == set(ctx.layers) and all(np.isfinite(x).all() for x in v.values())
    # the default group importance (mean over conv out, BN, next conv in) ranks differently from l2 alone
    assert any(not np.array_equal(np.argsort(v[n]), np.argsort(SCORES["l2"](ctx, 0)[n])) for n in ctx.layers)


def test_tp_importance_on_residual_groups_gives_every_member_conv_the_root_value():
    from axes_pipeline.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=0.125).eval()
    x = torch.randn(1, 3, 16, 16)
    ctx = ScoreContext(model, conv_layers(model), example=x)
    v = resolve_score("tp.MagnitudeImportance")(ctx, 0)
    groups = build_groups(model, x)
    multi = [g for g in groups.groups if len(g.convs) > 1]
    assert multi
    for g in multi:
        root = v[g.convs[0]][g.channel_of[g.convs[0]]]
        for c in g.convs[1:]:
            assert np.allclose(v[c][g.channel_of[c]], root)


# ---------------------------------------------------------------------------------- a real backbone
@pytest.mark.parametrize("kind", ["knapsack", "sensitivity", "hybrid-uniform"])
def test_new_allocations_match_flops_on_resnet_checked_by_fvcore(kind):
    from axes_pipeline.models import build_model
    from axes_pipeline.pruning.flops import fvcore_macs
    from axes_pipeline.pruning.groups import prune_physically

    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=0.25).eval()
    x = torch.randn(1, 3, 16, 16)
    groups = build_groups(model, x)
    cost = CostModel.build(model, groups, x)
    rng = np.random.default_rng(0)
    gs = [rng.random(g.size) for g in groups.groups]
    drops = np.sort(rng.random((len(groups.groups), 3)) * 0.3, axis=1)
    source = {"knapsack": None, "hybrid-uniform": CountSource("uniform"),
              "sensitivity": CountSource("sensitivity", sensitivity_keys(groups.sizes, [0.25, 0.5, 0.75], drops))}[kind]
    alloc = make_allocation(kind.split("-")[0], groups, gs, 0.9, counts_from=source, cost=cost)
    for t in (0.9, 0.7, 0.5, 0.3, 0.1):
        res = match_flops(alloc, cost, t, 0.005)
        assert res.matched and abs(res.frac - t) <= 0.005, (kind, t, res.frac)
        assert (res.counts <= np.floor(0.9 * groups.sizes)).all() and (res.counts < groups.sizes).all()
        if t in (0.7, 0.3):
            pruned, _ = prune_physically(model, groups, keep_masks(alloc, res.counts), x)
            assert abs(fvcore_macs(pruned, x)[0] / cost.total - t) <= 0.005


# ---------------------------------------------------------------------------------- end to end (tiny digits run)
FAST = ["pruning.latency=false", "pruning.targets=[0.9,0.7,0.5]", "pruning.calibration.n=128"]


def _prune(run, *extra):

    import pandas as pd

    from axes_pipeline.pruning.run import run_prune

    from .helpers import make_cfg, protocol_dir

    root, overrides = run
    cfg = make_cfg("prune", [*overrides, *FAST, *extra], root)
    summary = run_prune(cfg)
    out = protocol_dir(cfg)
    return summary, pd.read_csv(out / "prune_curves.csv"), out


@pytest.mark.parametrize("extra", [
    ["pruning.allocation=knapsack"],
    ["pruning.allocation=global", "pruning.normalize=lamp"],
    ["pruning.allocation=hybrid", "pruning.hybrid_counts_from=uniform"],
    ["pruning.allocation=hybrid", "pruning.hybrid_counts_from=l1"],
], ids=["knapsack", "global-lamp", "hybrid-uniform", "hybrid-l1"])
def test_each_allocation_runs_flops_matched_end_to_end(run, extra):
    summary, curves, _out = _prune(run, "pruning.scores=[bn_scale]", *extra)
    assert len(curves) == 3 and summary["matching"]["unmatched"] == 0
    assert (curves["achieved_flops"] - curves["target_flops"]).abs().max() <= 0.005   # fvcore's count
    assert (curves["macs"] == curves["macs_analytic"]).all()
    assert summary["allocation"] == extra[0].split("=")[1]


def test_sensitivity_scan_is_run_once_and_reused_by_another_protocol(run, capsys):
    summary, curves, out = _prune(run, "pruning.scores=[l2]", "pruning.allocation=sensitivity")
    assert summary["matching"]["unmatched"] == 0 and len(curves) == 3
    assert "sensitivity scan:" in capsys.readouterr().out
    scan = out.parent / "scores" / "sensitivity.json"   # prune/scores/: shared by every protocol
    from axes_pipeline.runs import read_json

    rec = read_json(scan)
    assert np.asarray(rec["drops"]).shape == (summary["groups"], 3) and rec["fractions"] == [0.25, 0.5, 0.75]
    stamp = scan.stat().st_mtime_ns
    summary, curves, _ = _prune(run, "pruning.scores=[bn_scale]", "pruning.allocation=hybrid",
                                "pruning.hybrid_counts_from=sensitivity")
    assert summary["matching"]["unmatched"] == 0
    assert "sensitivity scan:" not in capsys.readouterr().out and scan.stat().st_mtime_ns == stamp


def test_a_torch_pruning_importance_is_swept_like_a_score(run):
    summary, curves, _out = _prune(run, "pruning.scores=[tp.MagnitudeImportance,l2]")
    assert set(curves["score"]) == {"tp.MagnitudeImportance", "l2"} and summary["matching"]["unmatched"] == 0
    assert summary["scores"]["tp.MagnitudeImportance"]["axis"] == "baseline"
    assert np.isfinite(summary["scores"]["tp.MagnitudeImportance"]["flops_auc"])


@pytest.mark.parametrize("args,knob", [
    (["pruning.allocation=hybrid", "pruning.hybrid_counts_from=tayler"], "pruning.hybrid_counts_from"),
    (["pruning.scores=[l1,ixy_minus_red_b-5]"], "β must be ≥ 0"),
])
def test_bad_allocation_knobs_from_the_command_line_exit_2_before_any_work(tmp_path, args, knob):
    from .helpers import run_entry

    res = run_entry("prune.py", *args, "logger=none", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and knob in lines[0] and "Traceback" not in res.stderr
    assert "(pruning.scores)" not in lines[0] or knob != "pruning.hybrid_counts_from"
    # (a refusal still leaves the run folder's .hydra and prune.failed marker: issue #31 case 8, not here)


def test_the_scan_needs_a_validation_split():
    from axes_pipeline.pruning.sensitivity import check_scan_data

    check_scan_data(True, 10)
    check_scan_data(False, 0)
    with pytest.raises(UserError, match="needs a validation split"):
        check_scan_data(True, 0)


def test_a_drawing_tp_importance_is_seeded_by_the_run(chain):
    _model, ctx = chain
    s = resolve_score("tp.RandomImportance")
    a, b = s(ctx, 0), s(ctx, 0)
    assert all(np.array_equal(a[n], b[n]) for n in a)


def test_a_plugin_registers_an_importance_instance(chain):
    import torch_pruning as tp

    from axes_pipeline.pruning.scores import register_importance, score_names

    _model, ctx = chain
    try:
        s = register_importance("my_l1", tp.importance.MagnitudeImportance(p=1, normalizer=None,
                                                                           group_reduction="first"))
        assert "my_l1" in score_names() and resolve_score("my_l1") is s and s.axis == "baseline"
        ours = SCORES["l1"](ctx, 0)
        assert all(np.allclose(v, ours[n], rtol=1e-5) for n, v in s(ctx, 0).items())
    finally:
        SCORES.pop("my_l1", None)
