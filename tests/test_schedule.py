"""Recovery and schedule (issue 30, METHODS §9): the iterative schedule's steps, their records and
resume; fine-tune budgets (epochs=0 = none); scratch training of the chosen points."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from axes_pipeline.errors import UserError
from axes_pipeline.pruning import schedule as prune_schedule
from axes_pipeline.pruning.run import run_prune
from axes_pipeline.pruning.schedule import step_caps, step_targets
from axes_pipeline.runs import read_json

from .helpers import make_cfg, prune_settings

FAST = ["pruning.latency=false"]


@pytest.fixture
def run(tiny_run, tmp_path):
    """A private copy of the tiny trained run (checkpoints and summary), so tests do not share prune/."""
    root, overrides = tiny_run
    src = Path(make_cfg("train", overrides, root).paths.run_dir)
    dst = Path(make_cfg("train", overrides, tmp_path).paths.run_dir)
    dst.mkdir(parents=True)
    shutil.copytree(src / "checkpoints", dst / "checkpoints", ignore=shutil.ignore_patterns("epoch_*"))
    shutil.copy2(src / "train_summary.json", dst / "train_summary.json")
    return tmp_path, overrides


def _cfg(run, *extra):
    root, overrides = run
    return make_cfg("prune", [*overrides, *FAST, *extra], root)


def _prune_dir(cfg) -> Path:
    return Path(cfg.paths.run_dir) / "prune"


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
    cfg = _cfg(run, "pruning.scores=[l2]", "pruning.schedule=iterative", "pruning.steps=2", "pruning.targets=[0.5]",
               "pruning.finetune.epochs=1", "pruning.finetune.max_batches=2", "pruning.finetune.between_steps=true",
               "pruning.fvcore_check=false")
    run_prune(cfg)
    want = pd.read_csv(_prune_dir(cfg) / "prune_curves.csv")
    folder = _prune_dir(cfg) / "steps" / "l2__0.5"
    assert read_json(folder / "step1.json")["finetune_steps"] == 2 and (folder / "step1.pt").is_file()
    assert "finetune_steps" not in read_json(folder / "step2.json")   # the last step's fine-tune is the point's
    # the point is lost, its steps are not: step 2 is recomputed from step 1's fine-tuned weights
    (folder / "step2.json").unlink()
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
