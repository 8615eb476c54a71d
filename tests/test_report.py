"""The cross-run report on synthetic run directories: headline statistics, grouping, missing stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from axes_pipeline.errors import UserError
from axes_pipeline.report.build import run_report
from axes_pipeline.runs import fingerprint

from .helpers import make_cfg, run_entry

TARGETS = [0.9, 0.7, 0.5, 0.3, 0.1]


def fake_run(root: Path, seed: int, *, local_gain: float, epochs: int = 20, prune: bool = True,
             analyze: bool = True, model: str = "resnet18", protocol: str = "default",
             settings: dict | None = None) -> Path:
    """A run folder as the stages leave it; its pruning results in ``prune/<protocol>/`` (with ``settings``
    in its protocol.json: the default global protocol unless given)."""
    run = root / "multirun" / "demo" / f"digits-{model}-w0.25" / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)     # again: another protocol's results for the same run
    cfg = {"seed": seed, "name": "demo", "data": {"name": "digits"}, "model": {"name": model, "width": 0.25},
           "trainer": {"max_epochs": epochs}, "paths": {"run_dir": str(run)}}
    (run / "train_summary.json").write_text(json.dumps({"val_acc": 0.97, "test_acc": 0.96, "epochs": epochs,
                                                        "config": cfg}))
    rng = np.random.default_rng(seed)
    if prune:
        rows = []
        for score, axis, gain in (("input_capture", "local", local_gain), ("hull_score", "local", 0.0),
                                  ("task_info", "target", 0.0), ("l1", "baseline", 0.01)):
            for t in TARGETS:
                acc = 0.96 * t ** 0.5 + gain + rng.normal(0, 0.002)
                # validation follows test closely, as on a real run: the choice is made on it
                rows.append({"score": score, "axis": axis, "draw": 0, "target_flops": t, "target_channels": np.nan,
                             "achieved_flops": t + 0.001, "acc_before_ft": acc,
                             "val_acc_before_ft": acc + rng.normal(0, 0.001)})
        folder = run / "prune" / protocol
        folder.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(folder / "prune_curves.csv", index=False)
        (folder / "prune_summary.json").write_text(json.dumps({"unpruned_acc": 0.96, "unpruned_val_acc": 0.97,
                                                               "targets": TARGETS}))
        settings = settings or {"allocation": "global", "normalize": "minmax", "mode": "flops", "targets": TARGETS}
        (folder / "protocol.json").write_text(json.dumps({"protocol": protocol, "fingerprint": fingerprint(settings),
                                                          "label": f"{settings['allocation']}, one-shot",
                                                          "settings": settings}))
    if analyze:
        (run / "analyze").mkdir(exist_ok=True)
        pd.DataFrame({"layer": ["conv1", "layer1.0.conv1"], "layer_index": [0, 1], "channels": [16, 16],
                      "align_input_capture_task_info": [0.5 + 0.01 * seed % 3, 0.1], "modularity_gap": [0.1, 0.2],
                      "hull_size_mean": [3.0, 4.0], "hull_saturated_frac": [0.1, 0.2], "s3_s2": [0.3, 0.4]}
                     ).to_csv(run / "analyze" / "layers.csv", index=False)
    return run


def _report(root: Path, *extra):
    cfg = make_cfg("report", ["experiment=demo", "logger=none", "report.n_boot=2000", *extra], root)
    return cfg, run_report(cfg)


def test_constant_local_advantage_gives_ci_above_zero(tmp_path):
    for s in (1, 2, 3, 4, 5):
        fake_run(tmp_path, s, local_gain=0.05)
    cfg, summary = _report(tmp_path)
    out = tmp_path / "multirun" / "demo" / "report"
    head = pd.read_csv(out / "headline.csv")
    best = head[head.comparison.str.startswith("best local")].iloc[0]
    assert "input_capture" in best.comparison and "task_info" in best.comparison
    assert best.ci_lo > 0 and best["diff"] == pytest.approx(0.05, abs=0.01)
    assert best.p_value == pytest.approx(0.0625)           # 5 seeds, all positive: the exact floor
    for f in ("report.md", "report.html", "flops_auc.csv", "accuracy_by_target.csv", "layers.csv", "reference.csv",
              "headline.png", "alignment_depth.png"):
        assert (out / f).is_file(), f
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "class=\"report\"" in html


def test_identical_axes_give_p_one(tmp_path):
    for s in (1, 2, 3):
        fake_run(tmp_path, s, local_gain=0.0)
    # make the local and target curves identical per seed
    for curves in tmp_path.rglob("prune_curves.csv"):
        d = pd.read_csv(curves)
        ref = d[d.score == "task_info"].set_index("target_flops")["acc_before_ft"]
        for sc in ("input_capture", "hull_score"):
            d.loc[d.score == sc, "acc_before_ft"] = d.loc[d.score == sc, "target_flops"].map(ref).to_numpy()
        d.to_csv(curves, index=False)
    _report(tmp_path)
    head = pd.read_csv(tmp_path / "multirun" / "demo" / "report" / "headline.csv")
    assert (head.p_value > 0.99).all() and (head["diff"].abs() < 1e-12).all()


def test_fewer_than_three_seeds_says_not_possible(tmp_path):
    for s in (1, 2):
        fake_run(tmp_path, s, local_gain=0.05)
    _report(tmp_path)
    md = (tmp_path / "multirun" / "demo" / "report" / "report.md").read_text()
    assert "the paired test is not possible" in md
    head = pd.read_csv(tmp_path / "multirun" / "demo" / "report" / "headline.csv")
    assert head.p_value.isna().all() and head.ci_lo.isna().all()


def test_mismatched_configs_are_grouped_and_named(tmp_path, capsys):
    fake_run(tmp_path, 1, local_gain=0.0, epochs=20)
    fake_run(tmp_path, 2, local_gain=0.0, epochs=30)
    _, summary = _report(tmp_path)
    assert len(summary["groups"]) == 2
    assert any("trainer.max_epochs" in n for n in summary["notices"])
    assert "never pooled" in capsys.readouterr().out


def test_seeds_pruned_differently_are_never_paired(tmp_path):
    for s in (1, 2, 3, 4):   # one protocol name, two settings (a schema default changed between the seeds)
        alloc = "global" if s <= 2 else "uniform"
        fake_run(tmp_path, s, local_gain=0.05, settings={"allocation": alloc, "mode": "flops", "targets": TARGETS})
    _, summary = _report(tmp_path)
    assert any("allocation" in n and "never paired" in n for n in summary["notices"])
    head = pd.read_csv(tmp_path / "multirun" / "demo" / "report" / "headline.csv")
    assert head.group.nunique() == 2 and (head.n == 2).all()


def test_headline_rows_and_leave_one_seed_out_choice(tmp_path):
    for s in (1, 2, 3, 4, 5):
        fake_run(tmp_path, s, local_gain=0.05)
    _report(tmp_path)
    head = pd.read_csv(tmp_path / "multirun" / "demo" / "report" / "headline.csv")
    held = head[head.comparison.str.contains("other seeds")].iloc[0]
    assert held["diff"] == pytest.approx(0.05, abs=0.01) and "input_capture/task_info" in held.note
    assert (head.p_holm >= head.p_value - 1e-12).all() and head.candidates.str.contains("2 local / 1 target").all()


def test_report_renders_with_missing_stages(tmp_path):
    fake_run(tmp_path, 1, local_gain=0.0, prune=False, analyze=False)
    _report(tmp_path)
    md = (tmp_path / "multirun" / "demo" / "report" / "report.md").read_text()
    assert "No pruning results" in md and "No analysis results" in md and "No lesion results" in md


def test_no_runs_says_what_it_looked_for(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="train_summary.json"):
        _report(tmp_path, f"report.sweep={tmp_path / 'empty'}")
    res = run_entry("report.py", "logger=none", "name=nothing", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: report:")


def test_slurm_without_sbatch_is_refused(tmp_path):
    import shutil

    if shutil.which("sbatch"):
        pytest.skip("sbatch exists here")
    res = run_entry("train.py", "-m", "seed=1,2", "hydra/launcher=submitit_slurm", "logger=none", cwd=tmp_path)
    assert res.returncode == 2 and "sbatch" in res.stderr
    assert not list(tmp_path.rglob("train_summary.json"))


@pytest.mark.parametrize("launcher", ["slurm", "submitit_slurm", "parallel", "joblib"])
def test_launcher_configs_compose(launcher, tmp_path):
    from hydra import compose, initialize_config_dir

    from .helpers import CONF

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    if "slurm" in launcher:
        assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
        if launcher == "slurm":
            assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.tasks_per_node == 1
    else:
        assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")


# ------------------------------------------------------------------ selection split, damaged curves


def _per_seed(root: Path):
    from axes_pipeline.report import tables
    from axes_pipeline.report.collect import discover, group_runs

    groups, _ = group_runs(discover([root / "multirun" / "demo"]))
    return groups, tables.auc_per_seed(groups, "acc_before_ft")


def test_best_score_is_chosen_on_validation_not_test(tmp_path):
    from axes_pipeline.report import tables

    for s in (1, 2, 3, 4):
        fake_run(tmp_path, s, local_gain=0.0)
    # hull_score is the better local score on validation, input_capture on test
    for curves in tmp_path.rglob("prune_curves.csv"):
        d = pd.read_csv(curves)
        d.loc[d.score == "hull_score", "val_acc_before_ft"] += 0.03
        d.to_csv(curves, index=False)
    _, per_seed = _per_seed(tmp_path)
    kw = dict(min_n=3, n_boot=200, method="wilcoxon")
    head = tables.headline(per_seed, **kw)
    best = head[head.comparison.str.startswith("best local (")].iloc[0]
    assert "hull_score" in best.comparison and best.selected_on == "val" and best.measured_on == "test"
    # changing only the test accuracies never changes the choice
    for curves in tmp_path.rglob("prune_curves.csv"):
        d = pd.read_csv(curves)
        d.loc[d.score == "input_capture", "acc_before_ft"] += 0.2
        d.to_csv(curves, index=False)
    _, per_seed2 = _per_seed(tmp_path)
    head2 = tables.headline(per_seed2, **kw)
    assert list(head2.comparison) == list(head.comparison)
    held = head2[head2.comparison.str.contains("other seeds")].iloc[0]
    assert "choices: hull_score/task_info" == held.note.split("; ")[-1]
    assert head2.p_holm.notna().all() and (head2.p_holm >= head2.p_value - 1e-12).all()   # all in the Holm family


def test_damaged_curves_are_listed_not_dropped_silently(tmp_path):
    from axes_pipeline.report import tables

    runs = [fake_run(tmp_path, s, local_gain=0.0) for s in (1, 2, 3)]
    bad = runs[1] / "prune" / "default" / "prune_curves.csv"
    d = pd.read_csv(bad)
    d.loc[3, "acc_before_ft"] = np.nan
    d.to_csv(bad, index=False)
    old = runs[2] / "prune" / "default" / "prune_curves.csv"                 # curves from before selection on validation
    pd.read_csv(old).drop(columns=["val_acc_before_ft"]).to_csv(old, index=False)
    groups, per_seed = _per_seed(tmp_path)
    assert sorted(per_seed.seed.unique()) == [1]
    skipped = dict(tables.skipped_prune_runs(groups, "acc_before_ft"))
    assert set(skipped) == {str(runs[1]), str(runs[2])}
    assert "acc_before_ft holds 1 NaN" in skipped[str(runs[1])] and "val_acc_before_ft" in skipped[str(runs[2])]


def test_curves_from_another_prune_run_than_the_summary_are_skipped(tmp_path):
    import hashlib

    from axes_pipeline.report import tables

    run = fake_run(tmp_path, 1, local_gain=0.0)
    summary = json.loads((run / "prune" / "default" / "prune_summary.json").read_text())
    summary["curves_sha256"] = hashlib.sha256(b"other curves").hexdigest()
    (run / "prune" / "default" / "prune_summary.json").write_text(json.dumps(summary))
    groups, per_seed = _per_seed(tmp_path)
    assert per_seed.empty
    (why,) = [w for _, w in tables.skipped_prune_runs(groups, "acc_before_ft")]
    assert "does not match prune_summary.json" in why


# ----------------------------------------------------------------------------- the page people read


def add_lesions_and_propagation(run: Path, seed: int) -> None:
    """A per-run lesion summary and propagation table shaped like analyze.py's."""
    def fit(d):
        return {"n": 160, "r2_base": 0.2, "r2_full": 0.2 + d, "delta_r2": d, "delta_r2_adj": d - 0.01,
                "ci_lo": d / 2, "ci_hi": 2 * d, "ci_adj_lo": -0.01, "ci_adj_hi": 2 * d, "p_f": 0.01, "n_boot": 200}
    summary = {"base_loss": 0.3, "layers": 2, "channels_lesioned": 16,
               "spearman_overall": {"input_capture": 0.1, "task_info": 0.3},
               "binned_rho_mean": {"input_capture": 0.05 + 0.01 * seed, "task_info": 0.2},
               "incremental_r2": {"base": ["input_capture", "task_info"], "extra": ["full_explained"], "scale": "rank",
                                  "pooled": fit(0.04), "pooled_raw": fit(0.1), "per_layer": {"conv1": fit(0.2)}},
               "recovery": {"hull_mean": 0.4, "hull_median": 0.7, "hull_n": 12, "rho_hull_full_explained": 0.35},
               "per_layer": {"conv1": {"lesioned": 8}}}
    (run / "analyze" / "lesion_summary.json").write_text(json.dumps(summary))
    pd.DataFrame({"upstream": ["conv1"] * 2, "downstream": ["layer1.0.conv1"] * 2, "pairing": ["local_to_local",
                  "target_to_target"], "rho": [0.3, 0.1], "null_rho": [0.0, 0.01], "n": [16, 16]}
                 ).to_csv(run / "analyze" / "propagation.csv", index=False)


def full_sweep(root: Path, seeds=(1, 2, 3)) -> Path:
    for s in seeds:
        add_lesions_and_propagation(fake_run(root, s, local_gain=0.05), s)
    return root / "multirun" / "demo" / "report"


def test_fmt_three_significant_digits():
    from axes_pipeline.report.build import fmt, fmt_ci, fmt_pm

    assert [fmt(x) for x in (0.9996, 0.0625, 12345.0, 7.35e-4, -0.5, 0.0, 1.0, 99999.6)] == \
        ["1.00", "0.0625", "12300", "7.35e−4", "−0.500", "0", "1.00", "1.00e5"]
    assert fmt(float("nan")) == "—" and fmt(float("inf")) == "∞" and fmt(3) == "3" and fmt(True) == "yes"
    assert fmt_ci(0.1, 0.25) == "[0.100, 0.250]" and fmt_ci(float("nan"), float("nan")) == "—"
    assert fmt_pm(0.5, 0.01) == "0.500 ± 0.0100" and fmt_pm(0.5, 0.01, 2, 3) == "0.500 ± 0.0100 (n=2)"


def test_page_answers_first_and_reads_plainly(tmp_path):
    out = full_sweep(tmp_path)
    # one seed's lesion summary damaged: its skip reason names a path and a command in backticks
    (out.parent / "digits-resnet18-w0.25" / "seed3" / "analyze" / "lesion_summary.json").write_text("{broken")
    _report(tmp_path)
    html, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    # the answer first: headline figure and pruning curves, then the headline table with a verdict in words
    first_img, first_table = html.index("<img"), html.index("<table")
    assert html.index('id="answer"') < first_img < first_table < html.index('id="auc"')
    assert html[first_img:first_table].count("<img") == 2 and "pruning curves" in html[first_img:first_table]
    head = html[first_table:html.index("</table>", first_table)]
    assert "local axis better (CI above 0" in head and "95% CI" in head
    # every section opens with one sentence on how to read it
    assert html.count("<h2") == html.count('<p class="how">') >= 7
    # H4 in readable tables (ΔR² with its CI as [lo, hi]); the key/value dump only in the CSV
    assert "ΔR²" in html and "[0.0200, 0.0800]" in html and "ρ within I_T bins" in html and "Recovery" in html
    assert "incremental_r2.pooled" not in html and "incremental_r2.pooled" not in md
    assert "incremental_r2.pooled.ci_adj_hi" in set(pd.read_csv(out / "lesions.csv")["quantity"])
    assert "local_to_local" in html
    # no machine paths, no literal markdown, every table scrolls inside its own box, nothing external
    for page in (html, md):
        assert str(tmp_path) not in page
    assert "`" not in html and "<code>" in html and "digits-resnet18-w0.25/seed3" in html
    assert html.count("<table") == html.count('<div class="scroll">') > 5
    assert 'src="http' not in html and "<script" not in html
    # the markdown links the figures written beside it
    import re

    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / name).is_file(), name
    # the same results give the same page, byte for byte
    _report(tmp_path)
    assert (out / "report.html").read_text() == html and (out / "report.md").read_text() == md


def test_report_ci_choice(tmp_path):
    for s in (1, 2, 3):
        fake_run(tmp_path, s, local_gain=0.05)
    with pytest.raises(UserError, match="report.ci must be one of t, bca, percentile"):
        _report(tmp_path, "report.ci=studentized")
    out = tmp_path / "multirun" / "demo" / "report"
    _report(tmp_path)
    head = pd.read_csv(out / "headline.csv")
    assert (head.ci_method == "t").all()
    # the sentence under the forest plot names the interval
    assert "paired Student t 95% CI" in (out / "report.md").read_text()
    _report(tmp_path, "report.ci=percentile")
    head = pd.read_csv(out / "headline.csv")
    assert (head.ci_method == "percentile").all()
    # a bootstrap interval is labelled with its measured coverage
    assert "percentile bootstrap 95% CI (covers ~85% at 5 seeds)" in (out / "report.md").read_text()


def test_pruning_curve_lines_are_named_and_best_emphasised():
    from axes_pipeline.report.figures import score_styles

    styles = score_styles({"local": ["input_capture", "hull_score", "ixy_minus_red_b0.3"],
                           "target": ["task_info", "composite_target"], "baseline": ["l1", "random"]},
                          {"local": "hull_score", "target": "task_info", "baseline": "random"})
    colours = [tuple(st["color"]) for st in styles.values()]
    assert len(set(colours)) == len(colours)                     # every line can be told from the others
    assert styles["hull_score"]["label"] == "hull_score (best local)" and styles["hull_score"]["lw"] == 3.0
    assert styles["task_info"]["label"] == "task_info (best target)" and styles["task_info"]["ls"] == "--"
    assert styles["random"]["lw"] == styles["input_capture"]["lw"] < 3.0    # baselines are not emphasised


def test_backbones_side_by_side(tmp_path):
    # two backbones of one report: one headline row each, and the page's table with a column per backbone
    for s in (1, 2, 3):
        fake_run(tmp_path, s, local_gain=0.05)
        fake_run(tmp_path, s, local_gain=0.0, model="vgg16")
    _report(tmp_path)
    out = tmp_path / "multirun" / "demo" / "report"
    side = pd.read_csv(out / "backbones.csv")
    assert list(side.group) == ["digits-resnet18-w0.25", "digits-vgg16-w0.25"]
    head = pd.read_csv(out / "headline.csv")
    assert (side.set_index("group")["diff"] == head.drop_duplicates("group").set_index("group")["diff"]).all()
    assert side.comparison.str.startswith("best local (input_capture)").all()
    md = (out / "report.md").read_text()
    section = md.split("## Backbones side by side", 1)[1].split("\n## ", 1)[0]
    assert "| quantity | digits-resnet18-w0.25 | digits-vgg16-w0.25 |" in section
    assert "| best local / best target | input_capture / task_info | input_capture / task_info |" in section


def test_one_colour_per_axis_in_every_figure():
    import colorsys

    import matplotlib
    from matplotlib.colors import to_rgb

    import axes_pipeline.pruning.plots as prune_plots
    import axes_pipeline.report.figures as report_figures
    from axes_pipeline import plotting

    assert prune_plots.AXIS_CMAPS is plotting.AXIS_CMAPS and report_figures.AXIS_CMAPS is plotting.AXIS_CMAPS
    assert report_figures.AXIS_COLORS is plotting.AXIS_COLORS
    # an axis's colour map is the hue of its colour (mixed: purple in the pruning plots and the report alike)
    for axis, colour in plotting.AXIS_COLORS.items():
        h, _, s = colorsys.rgb_to_hls(*to_rgb(colour))
        h_map, _, s_map = colorsys.rgb_to_hls(*matplotlib.colormaps[plotting.AXIS_CMAPS[axis]](0.75)[:3])
        assert (s < 0.1 and s_map < 0.1) or min(abs(h - h_map), 1 - abs(h - h_map)) < 0.06, axis
    curves = pd.DataFrame({"score": ["magnitude_plus_ix_a0.5"], "axis": ["mixed"]})
    got = prune_plots._styles(curves)["magnitude_plus_ix_a0.5"][0]
    want = report_figures.score_styles({"mixed": ["magnitude_plus_ix_a0.5"]}, {})["magnitude_plus_ix_a0.5"]["color"]
    assert colorsys.rgb_to_hls(*got[:3])[0] == pytest.approx(colorsys.rgb_to_hls(*want[:3])[0], abs=0.06)
    assert plotting.axis_legend() == "blue: local, red: target, purple: mixed, gray: baseline"


def test_every_figure_is_saved_atomically_at_one_dpi(tmp_path):
    import matplotlib.pyplot as plt
    from PIL import Image

    from axes_pipeline.plotting import DPI, save_figure

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [0, 1])
    path = save_figure(fig, tmp_path / "sub" / "f.png")
    assert not plt.fignum_exists(fig.number)                      # closed: a sweep draws hundreds
    assert [p.name for p in path.parent.iterdir()] == ["f.png"]   # no temporary file left beside it
    assert Image.open(path).info["dpi"] == pytest.approx((DPI, DPI), abs=0.01)
