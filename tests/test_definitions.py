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
    for seed, (i, t) in enumerate([(0.6, 0.1), (0.4, 0.2)]):
        for tag, v in (("init", i), ("trained", t)):
            rows.append({"point": "post_act", "spatial": "gap", "checkpoint": tag, "seed": seed, "layer": "a",
                         "align_input_capture_task_info": v, "hull_size_mean": 3.0 - v, "modularity_gap": v})
    tab = directions(pd.DataFrame(rows))
    rho = tab[tab.quantity == "align_input_capture_task_info"].iloc[0]
    assert rho.init_mean == pytest.approx(0.5) and rho.trained_mean == pytest.approx(0.15)
    assert rho.init_sd == pytest.approx(np.std([0.6, 0.4], ddof=1)) and rho.seeds == 2
    assert rho.direction == "falls" and rho.matches_paper is True
    hull = tab[tab.quantity == "hull_size_mean"].iloc[0]
    assert hull.direction == "rises" and hull.matches_paper is True
    gap = tab[tab.quantity == "modularity_gap"].iloc[0]
    assert gap.paper_direction == "not stated" and gap.matches_paper is None
    assert reproduces_init_coupling(tab) == ["post_act/gap"]


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
