"""Recovery and schedule (issue 30, METHODS §9): the iterative schedule's steps, their records and
resume; fine-tune budgets (epochs=0 = none); scratch training of the chosen points."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from axes_pipeline.errors import UserError
from axes_pipeline.pruning import schedule as prune_schedule
from axes_pipeline.pruning.run import run_prune
from axes_pipeline.pruning.schedule import step_caps, step_targets
from axes_pipeline.runs import read_json

from .helpers import make_cfg, protocol_dir, prune_settings

FAST = ["pruning.latency=false"]


def _cfg(run, *extra):
    root, overrides = run
    return make_cfg("prune", [*overrides, *FAST, *extra], root)


_prune_dir = protocol_dir   # prune/<protocol>/


# --- the rules, by hand ---
def test_step_targets_are_geometric_and_end_on_the_target():
    assert step_targets(0.5, 1) == [0.5]
    got = step_targets(0.125, 3)
    assert got == pytest.approx([0.5, 0.25, 0.125]) and got[-1] == 0.125   # 0.125^(1/3) = 0.5
    # every step removes the same fraction of what is left
    ratios = np.array(got) / np.array([1.0] + got[:-1])
    assert ratios == pytest.approx([0.5, 0.5, 0.5])


def test_step_caps_hold_the_cap_of_the_unpruned_width():
    # cap 0.9 of 10 channels = 9 may go in all; 4 gone already -> 5 more; 9 gone -> none; cap 0.5 of 3 -> 1
    assert step_caps(np.array([10, 10, 3]), np.array([6, 1, 3]), 0.9).tolist() == [5, 0, 2]
    assert step_caps(np.array([10, 3]), np.array([10, 2]), 0.5).tolist() == [5, 0]


@pytest.mark.parametrize("override, match", [
    (["pruning.schedule=stepwise"], "pruning.schedule"),
    (["pruning.schedule=iterative", "pruning.mode=channel_fraction"], "needs pruning.mode=flops"),
    (["pruning.finetune.between_steps=true", "pruning.finetune.epochs=1"], "needs pruning.schedule=iterative"),
    (["pruning.schedule=iterative", "pruning.finetune.between_steps=true"], "needs a budget"),
    (["pruning.finetune.enabled=true"], "give the budget"),
    (["pruning.scratch=true", "pruning.mode=channel_fraction"], "needs pruning.mode=flops"),
])
def test_bad_schedule_settings_fail_in_one_line(tmp_path, override, match):
    with pytest.raises(UserError, match=match):
        prune_settings(make_cfg("prune", override, tmp_path))


def test_finetune_budget_zero_is_none(tmp_path):
    s = prune_settings(make_cfg("prune", [], tmp_path))
    assert s.finetune is None and s.schedule == "oneshot" and s.steps == 1
    s = prune_settings(make_cfg("prune", ["pruning.finetune.epochs=2"], tmp_path))
    assert s.finetune["epochs"] == 2
    s = prune_settings(make_cfg("prune", ["pruning.finetune.epochs=2", "pruning.finetune.enabled=false"], tmp_path))
    assert s.finetune is None
    s = prune_settings(make_cfg("prune", ["pruning.schedule=iterative"], tmp_path))
    assert s.steps == 3


# --- the iterative schedule on the tiny run ---
ITER = ["pruning.schedule=iterative", "pruning.steps=3", "pruning.targets=[0.7,0.4]", "capture.n_cal=256"]


def test_iterative_points_are_matched_and_rescored(run):
    cfg = _cfg(run, "pruning.scores=[input_capture,taylor]", *ITER)
    run_prune(cfg)
    out = _prune_dir(cfg)
    curves = pd.read_csv(out / "prune_curves.csv")
    assert len(curves) == 4 and (curves["schedule"] == "iterative").all()
    # the final point matched at ±tolerance by fvcore's count of the pruned network
    assert ((curves["achieved_flops"] - curves["target_flops"]).abs() <= 0.005).all() and curves["matched"].all()
    for score in ("input_capture", "taylor"):
        steps = [read_json(out / "steps" / f"{score}__0.4" / f"step{i}.json") for i in (1, 2, 3)]
        assert [s["target"] for s in steps] == pytest.approx([0.4 ** (1 / 3), 0.4 ** (2 / 3), 0.4])
        for s in steps:
            assert abs(s["achieved_flops"] - s["target"]) <= 0.005
        # widths only fall, and the scores of step 2 are measured on the pruned network: one value
        # per channel left, not the one-shot values of those channels
        w1, w2 = steps[0]["widths"], steps[1]["widths"]
        assert all(w2[g] <= w1[g] for g in w1) and sum(w2.values()) < sum(w1.values())
        assert steps[1]["rescored"] and steps[1]["axes_remeasured"] == (score == "input_capture")
        oneshot = steps[0]["scores"]
        for layer, vals in steps[1]["scores"].items():
            assert len(vals) <= len(oneshot[layer])
        # layers whose every channel survived step 1 still get other values: their inputs or peers changed
        whole = [layer for layer in oneshot if len(steps[1]["scores"][layer]) == len(oneshot[layer])]
        assert whole and any(not np.allclose(steps[1]["scores"][layer], oneshot[layer]) for layer in whole)
        # the point's kept channels are the last step's, in unpruned indices
        point = read_json(out / "points" / f"{score}__0.4.json")
        assert point["group_kept"] == steps[2]["widths"]


def test_an_interrupted_iterative_point_resumes_to_identical_tables(run, monkeypatch):
    common = ["pruning.scores=[taylor,random]", "pruning.random_draws=1", *ITER]
    clean = _cfg(run, *common)
    run_prune(clean)
    want = pd.read_csv(_prune_dir(clean) / "prune_curves.csv")
    steps_want = read_json(_prune_dir(clean) / "steps" / "taylor__0.4" / "step3.json")
    shutil.rmtree(_prune_dir(clean))

    real = prune_schedule._step_scores
    calls = []

    def killed(sweep, score, draw, model, groups, i):   # a kill after step 1 of the first point
        if i == 2:
            raise KeyboardInterrupt
        calls.append(i)
        return real(sweep, score, draw, model, groups, i)

    monkeypatch.setattr(prune_schedule, "_step_scores", killed)
    with pytest.raises(KeyboardInterrupt):
        run_prune(clean)
    folder = _prune_dir(clean) / "steps" / "taylor__0.7"
    assert (folder / "step1.json").is_file() and not (folder / "step2.json").exists()
    stamp = (folder / "step1.json").stat().st_mtime_ns

    calls.clear()
    monkeypatch.setattr(prune_schedule, "_step_scores",
                        lambda *a: (calls.append(a[-1]), real(*a))[1])
    run_prune(clean)
    assert (folder / "step1.json").stat().st_mtime_ns == stamp and calls.count(1) == 3   # resumed at step 2
    got = pd.read_csv(_prune_dir(clean) / "prune_curves.csv")
    timing = [c for c in got.columns if c.endswith("_s")]
    pd.testing.assert_frame_equal(got.drop(columns=timing), want.drop(columns=timing))
    steps_got = read_json(_prune_dir(clean) / "steps" / "taylor__0.4" / "step3.json")
    assert {k: v for k, v in steps_got.items() if k != "seconds"} == {k: v for k, v in steps_want.items()
                                                                        if k != "seconds"}


def test_finetune_between_steps_resumes_from_the_stored_weights(run, monkeypatch):
    from axes_pipeline.pruning.evaluate import evaluate
    from axes_pipeline.pruning.export import load_pruned

    from .helpers import restore

    cfg = _cfg(run, "pruning.scores=[l2]", "pruning.schedule=iterative", "pruning.steps=2", "pruning.targets=[0.5]",
               "pruning.finetune.epochs=1", "pruning.finetune.max_batches=2", "pruning.finetune.between_steps=true",
               "pruning.fvcore_check=false", "pruning.export=true")
    run_prune(cfg)
    want = pd.read_csv(_prune_dir(cfg) / "prune_curves.csv")
    # the exported network replays both steps' histories: it is the network evaluated
    model = load_pruned(_prune_dir(cfg) / "models" / "l2_0.5.pt")
    acc = evaluate(model, restore(cfg).datamodule.test_dataloader(), torch.device("cpu"))
    assert acc["acc"] == pytest.approx(want["acc_after_ft"].iloc[0])
    folder = _prune_dir(cfg) / "steps" / "l2__0.5"
    assert read_json(folder / "step1.json")["finetune_steps"] == 2 and (folder / "step1.pt").is_file()
    assert "finetune_steps" not in read_json(folder / "step2.json")   # the last step's fine-tune is the point's
    # the point is lost, its steps are not: the network comes back from step 2's weights (a replayed
    # history alone would hold the unpruned, not fine-tuned, ones) ...
    for lost in ([], ["step2.json"]):   # ... or step 2 is recomputed from step 1's fine-tuned weights
        for name in lost:
            (folder / name).unlink()
        (_prune_dir(cfg) / "points" / "l2__0.5.json").unlink()
        run_prune(cfg)
        got = pd.read_csv(_prune_dir(cfg) / "prune_curves.csv")
        for col in ("acc_before_ft", "acc_after_ft", "achieved_flops", "finetune_loss"):
            assert got[col].tolist() == want[col].tolist()


def test_oneshot_points_keep_their_keys(run):
    """Adding the schedule knobs leaves a one-shot point's key (and so its stored file) as it was."""
    cfg = _cfg(run, "pruning.scores=[l2]", "pruning.targets=[0.5]", "pruning.fvcore_check=false")
    run_prune(cfg)
    rec = read_json(_prune_dir(cfg) / "points" / "l2__0.5.json")
    assert rec["schedule"] == "oneshot" and rec["steps"] == 1 and "schedule" not in rec["fingerprint"]


def test_budget_zero_writes_after_equal_to_before_and_no_ft_plot(run):
    cfg = _cfg(run, "pruning.scores=[l2]", "pruning.targets=[0.7,0.5]", "pruning.fvcore_check=false")
    run_prune(cfg)
    curves = pd.read_csv(_prune_dir(cfg) / "prune_curves.csv")
    assert (curves["finetune_epochs"] == 0).all()
    assert curves["acc_after_ft"].tolist() == curves["acc_before_ft"].tolist()
    assert curves["val_acc_after_ft"].tolist() == curves["val_acc_before_ft"].tolist()
    assert (_prune_dir(cfg) / "prune_curves.png").is_file() and not (_prune_dir(cfg) / "prune_curves_ft.png").exists()


# --- scratch training ---
def test_scratch_points_are_the_best_of_each_axis_and_random_at_the_nearest_targets():
    from axes_pipeline.pruning.scratch import scratch_points

    summary = {"best_local": {"score": "input_capture"}, "best_target": {"score": "task_info"},
               "scores": {"input_capture": {}, "task_info": {}, "random": {}, "l1": {}}}
    got = scratch_points(summary, [0.9, 0.8, 0.6, 0.45, 0.2], [0.7, 0.5, 0.3])
    # 0.7 is as near 0.8 as 0.6: the larger target (the milder cut) wins the tie
    assert got == [(s, 0, t) for s in ("input_capture", "task_info", "random") for t in (0.8, 0.45, 0.2)]
    assert scratch_points({"best_local": None, "best_target": None, "scores": {"l1": {}}}, [0.5], [0.5]) == []


def test_scratch_trains_the_pruned_widths_from_fresh_weights(run, monkeypatch):
    from axes_pipeline.models import example_input
    from axes_pipeline.pruning import scratch as prune_scratch
    from axes_pipeline.pruning.export import load_pruned, model_spec
    from axes_pipeline.pruning.groups import build_groups

    from .helpers import restore

    cfg = _cfg(run, "pruning.scores=[input_capture,task_info,random]", "pruning.random_draws=1",
               "pruning.targets=[0.7,0.5]", "pruning.scratch=true", "pruning.scratch_targets=[0.5]",
               "pruning.scratch_epochs=1", "pruning.export=true", "pruning.fvcore_check=false")
    # made-up axes read from one CSV (as test_pruning_run's no_axes_module): no capture, and the same table
    # digest on every run (a table computed in this process and the same table read back from its CSV
    # digest differently, which would recompute the axes points, and so their scratch runs, once)
    from axes_pipeline.models import conv_layers
    from axes_pipeline.pruning import inputs as prune_inputs

    trained = restore(cfg)
    rng = np.random.default_rng(0)
    cols = ["input_capture", "peer_overlap", "task_info", "target_excess", "task_redundancy", "task_unique"]
    rows = [{"layer": layer, "channel": c, **{k: float(rng.random()) for k in cols}}
            for layer, conv in conv_layers(trained.model).items() for c in range(conv.out_channels)]
    axes_csv = Path(trained.run_dir) / "analyze" / "axes.csv"
    axes_csv.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(axes_csv, index=False)
    monkeypatch.setattr(prune_inputs, "stage_axes", lambda knobs, tr, own, *a, **k: (pd.read_csv(axes_csv),
                                                                                       axes_csv.parent, {}))
    trained_nets = []
    real = prune_scratch.train_scratch

    def spy(net, *a, **k):
        trained_nets.append({n: p.detach().clone() for n, p in net.state_dict().items()})
        return real(net, *a, **k)

    monkeypatch.setattr(prune_scratch, "train_scratch", spy)
    summary = run_prune(cfg)
    out = _prune_dir(cfg)
    curves = pd.read_csv(out / "prune_curves.csv")
    chosen = curves[curves["acc_scratch"].notna()]
    names = {summary["best_local"]["score"], summary["best_target"]["score"], "random"}
    assert set(chosen["score"]) == names and (chosen["target_flops"] == 0.5).all() and len(chosen) == 3
    assert chosen["acc_scratch"].between(0, 1).all() and curves.loc[curves["acc_scratch"].isna(), "target_flops"].eq(0.7).all()
    assert len(summary["scratch"]["points"]) == 3 and len(trained_nets) == 3
    for label in ("random-d0", summary["best_local"]["score"]):
        folder = out / "scratch" / f"{label}_0.5"
        assert (folder / "scratch.json").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()

    # the network trained is the point's architecture with fresh weights: the pruned network's shapes,
    # none of its (trained) values; its BN statistics those of a new network
    pruned = load_pruned(out / "models" / "random-d0_0.5.pt").state_dict()
    first = trained_nets[-1]   # random's (the last score of the sweep)
    assert {n: tuple(v.shape) for n, v in first.items()} == {n: tuple(v.shape) for n, v in pruned.items()}
    convs = [n for n, v in pruned.items() if n.endswith("conv1.weight") or n.endswith("conv2.weight")]
    assert convs and all(not torch.allclose(first[n], pruned[n]) for n in convs)
    assert all(torch.equal(first[n], torch.zeros_like(first[n])) for n in first if n.endswith("running_mean"))
    # ... and the backbone's own initialisation, seeded: the same call gives the same weights
    dm = trained.datamodule
    example = example_input({"image_size": dm.image_size, "in_channels": getattr(dm, "in_channels", 3)})
    spec = model_spec(cfg.model, trained.datamodule.num_classes)
    groups = build_groups(trained.model, example)
    widths = read_json(out / "points" / "random-d0__0.5.json")["group_kept"]
    a = prune_scratch.scratch_net(spec, groups, widths, example, seed=3).state_dict()
    b = prune_scratch.scratch_net(spec, groups, widths, example, seed=3).state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a) and {n: v.shape for n, v in a.items()} == {
        n: v.shape for n, v in pruned.items()}

    trained_nets.clear()
    again = run_prune(cfg)                      # done: read back, not trained again
    assert trained_nets == [] and again["scratch"] == summary["scratch"]
