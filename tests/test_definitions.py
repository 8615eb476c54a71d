"""analysis=definitions (METHODS §1, §6): the dynamics' quantities at init and after training under every
activation point × sampling, resumable, with the paper's direction per quantity; the report's section."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from axes_pipeline.analyses.definitions import (
    DEFINITIONS,
    PAPER_DIRECTION,
    direction,
    directions,
    reproduces_init_coupling,
)
from axes_pipeline.errors import UserError

from .helpers import make_cfg

SMALL = ["capture.n_cal=120", "capture.samples_per_image=4", "capture.layers=[conv1]", "gradients.enabled=false",
         "graphs.null_shuffles=1", "device=cpu"]


@pytest.fixture(scope="module")
def def_root(tiny_run, tmp_path_factory):
    root, overrides = tiny_run
    mine = tmp_path_factory.mktemp("defs") / "root"
    shutil.copytree(root, mine, ignore=shutil.ignore_patterns("analyze", "prune"))
    return mine, overrides


def _out(root):
    return root / "runs" / "default" / "digits-resnet18-w0.125" / "seed42" / "analyze"


def test_direction_and_the_paper_match():
    assert direction(0.5, 0.1) == "falls" and direction(1.0, 2.0) == "rises"
    assert direction(1.0, 1.0) == "flat" and direction(np.nan, 1.0) == "n/a"
    rows = []
    for seed, (i, t) in enumerate([(0.6, 0.1), (0.4, 0.0), (0.5, 0.05)]):
        for tag, v in (("init", i), ("trained", t)):
            rows.append({"point": "post_act", "spatial": "gap", "checkpoint": tag, "seed": seed, "layer": "a",
                         "align_input_capture_task_info": v, "hull_size_mean": 3.0 - v, "modularity_gap": v})
    tab = directions(pd.DataFrame(rows))
    rho = tab[tab.quantity == "align_input_capture_task_info"].iloc[0]
    assert rho.init_mean == pytest.approx(0.5) and rho.trained_mean == pytest.approx(0.05)
    assert rho.init_sd == pytest.approx(np.std([0.6, 0.4, 0.5], ddof=1)) and rho.seeds == 3
    # the per-seed changes −0.5, −0.4, −0.45: Student t interval over the 3 seeds, entirely below 0
    ch = np.array([-0.5, -0.4, -0.45])
    half = 4.3026527297 * ch.std(ddof=1) / np.sqrt(3)
    assert rho.change_ci_lo == pytest.approx(ch.mean() - half) and rho.change_ci_hi == pytest.approx(ch.mean() + half)
    assert rho.change_ci_hi < 0 and rho.direction == "falls" and rho.matches_paper is True
    hull = tab[tab.quantity == "hull_size_mean"].iloc[0]
    assert hull.direction == "rises" and hull.matches_paper is True
    gap = tab[tab.quantity == "modularity_gap"].iloc[0]
    assert gap.paper_direction == "not stated" and gap.matches_paper is None
    assert reproduces_init_coupling(tab) == ["post_act/gap"]


def test_a_direction_from_the_means_alone_is_not_the_papers():
    # the post_act/gap: per-seed changes −0.101, +0.151, −0.130 have a falling mean but an
    # interval that includes 0: no clear change, and not "matches the paper"
    rows = [{"point": "post_act", "spatial": "gap", "checkpoint": tag, "seed": seed, "layer": "a",
             "align_input_capture_task_info": 0.3 + (c if tag == "trained" else 0.0)}
            for seed, c in enumerate([-0.101, 0.151, -0.130]) for tag in ("init", "trained")]
    rho = directions(pd.DataFrame(rows)).iloc[0]
    assert rho.trained_mean < rho.init_mean and rho.change_ci_lo < 0 < rho.change_ci_hi
    assert rho.direction == "no clear change" and rho.matches_paper is False
    assert reproduces_init_coupling(directions(pd.DataFrame(rows))) == []
    # one seed: the point's direction, said to have no interval, and no verdict on the paper
    one = directions(pd.DataFrame([r for r in rows if r["seed"] == 0])).iloc[0]
    assert one.direction == "falls (1 seed: no interval)" and one.matches_paper is None


def test_post_bn_identical_to_pre_bn_is_shown_once():
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(3):
        for tag in ("init", "trained"):
            hull, rho = rng.normal(4, 0.3), rng.normal(0.2, 0.1)
            for point in ("pre_bn", "post_bn"):
                # hull size unchanged by the per-channel affine map; ρ(I_X, I_T) differs
                rows.append({"point": point, "spatial": "sample", "checkpoint": tag, "seed": seed, "layer": "a",
                             "hull_size_mean": hull, "align_input_capture_task_info": rho + (point == "post_bn") * 0.05,
                             # the same at init only: shown twice, the post_bn row says so
                             "s3_s2": 0.2 if tag == "init" else 0.3 + 0.1 * (point == "post_bn") + 0.01 * seed})
    tab = directions(pd.DataFrame(rows))
    hull = tab[tab.quantity == "hull_size_mean"]
    assert list(hull.point) == ["pre_bn"] and hull.note.iloc[0].startswith("= post_bn/sample (eval-mode BN")
    assert list(tab[tab.quantity == "align_input_capture_task_info"].point) == ["pre_bn", "post_bn"]
    s3 = tab[tab.quantity == "s3_s2"].set_index("point")
    assert list(s3.index) == ["pre_bn", "post_bn"] and s3.loc["post_bn", "note"].startswith("post_bn = pre_bn at init")


def test_definitions_analysis_rows_resume_and_refusals(def_root):
    from axes_pipeline.analyses.analyze import run_analysis

    root, overrides = def_root
    head = run_analysis(make_cfg("analyze", [*overrides, "analysis=definitions", *SMALL], root))["definitions"]
    out = _out(root)
    frame = pd.read_csv(out / "definitions.csv")
    assert len(frame) == len(DEFINITIONS) * 2 * 6                # definitions × checkpoints × layers
    assert set(zip(frame.point, frame.spatial)) == set(DEFINITIONS)
    assert set(frame.checkpoint) == {"init", "trained"}
    for q in PAPER_DIRECTION:
        assert frame[q].notna().all(), q
    # the definitions differ: the activation point and the sampling change the measured quantities
    rho = frame.groupby(["point", "spatial", "checkpoint"]).align_input_capture_task_info.mean()
    assert rho.nunique() > 6
    assert head["parts_computed"] == 12 and (out / "plots" / "definitions.png").is_file()

    parts = sorted((out / "definitions_parts").glob("*.csv"))
    stamps = {p: p.stat().st_mtime_ns for p in parts}
    again = run_analysis(make_cfg("analyze", [*overrides, "analysis=definitions", *SMALL, "plots=false"], root))
    assert again["definitions"]["parts_computed"] == 0
    assert {p: p.stat().st_mtime_ns for p in parts} == stamps
    pd.testing.assert_frame_equal(pd.read_csv(out / "definitions.csv"), frame)
    # another metric setting is another fingerprint: every part is recomputed
    other = run_analysis(make_cfg("analyze", [*overrides, "analysis=definitions", *SMALL, "plots=false",
                                              "metrics.hull_eps=0.1"], root))
    assert other["definitions"]["parts_computed"] == 12

    with pytest.raises(UserError, match="analysis.definitions.points"):
        run_analysis(make_cfg("analyze", [*overrides, "analysis=definitions", *SMALL,
                                          "analysis.definitions.points=[pre_bn,nosuch]"], root))
    with pytest.raises(UserError, match="no initial checkpoint"):
        run_analysis(make_cfg("analyze", [*overrides, "analysis=definitions", *SMALL,
                                          "analysis.definitions.init=epoch_999.ckpt"], root))
    # analysis=all sets required=false: a run without its initial checkpoint skips definitions, with a note
    skipped = run_analysis(make_cfg("analyze", [*overrides, "analysis=definitions", *SMALL, "plots=false",
                                                "analysis.definitions.init=epoch_999.ckpt",
                                                "analysis.definitions.required=false"], root))
    assert "no initial checkpoint" in skipped["definitions"]["skipped"]
