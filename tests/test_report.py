"""The cross-run report on synthetic run directories: headline statistics, grouping, missing stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from axes_pipeline.errors import UserError

from .helpers import TARGETS, fake_run, full_sweep, report_on, run_entry


def test_constant_local_advantage_gives_ci_above_zero(tmp_path):
    for s in (1, 2, 3, 4, 5):
        fake_run(tmp_path, s, local_gain=0.05)
    cfg, summary = report_on(tmp_path)
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
    report_on(tmp_path)
    head = pd.read_csv(tmp_path / "multirun" / "demo" / "report" / "headline.csv")
    assert (head.p_value > 0.99).all() and (head["diff"].abs() < 1e-12).all()


def test_fewer_than_three_seeds_says_not_possible(tmp_path):
    for s in (1, 2):
        fake_run(tmp_path, s, local_gain=0.05)
    report_on(tmp_path)
    md = (tmp_path / "multirun" / "demo" / "report" / "report.md").read_text()
    assert "the paired test is not possible" in md
    head = pd.read_csv(tmp_path / "multirun" / "demo" / "report" / "headline.csv")
    assert head.p_value.isna().all() and head.ci_lo.isna().all()


def test_mismatched_configs_are_grouped_and_named(tmp_path, capsys):
    fake_run(tmp_path, 1, local_gain=0.0, epochs=20)
    fake_run(tmp_path, 2, local_gain=0.0, epochs=30)
    _, summary = report_on(tmp_path)
    assert len(summary["groups"]) == 2
    assert any("trainer.max_epochs" in n for n in summary["notices"])
    assert "never pooled" in capsys.readouterr().out


def test_seeds_pruned_differently_are_never_paired(tmp_path):
    for s in (1, 2, 3, 4):   # one protocol name, two settings (a schema default changed between the seeds)
        alloc = "global" if s <= 2 else "uniform"
        fake_run(tmp_path, s, local_gain=0.05, settings={"allocation": alloc, "mode": "flops", "targets": TARGETS})
    _, summary = report_on(tmp_path)
    assert any("allocation" in n and "never paired" in n for n in summary["notices"])
    head = pd.read_csv(tmp_path / "multirun" / "demo" / "report" / "headline.csv")
    assert head.group.nunique() == 2 and (head.n == 2).all()


def test_headline_rows_and_leave_one_seed_out_choice(tmp_path):
    for s in (1, 2, 3, 4, 5):
        fake_run(tmp_path, s, local_gain=0.05)
    report_on(tmp_path)
    head = pd.read_csv(tmp_path / "multirun" / "demo" / "report" / "headline.csv")
    held = head[head.comparison.str.contains("other seeds")].iloc[0]
    assert held["diff"] == pytest.approx(0.05, abs=0.01) and "input_capture/task_info" in held.note
    assert (head.p_holm >= head.p_value - 1e-12).all() and head.candidates.str.contains("2 local / 1 target").all()


def test_report_renders_with_missing_stages(tmp_path):
    fake_run(tmp_path, 1, local_gain=0.0, prune=False, analyze=False)
    report_on(tmp_path)
    md = (tmp_path / "multirun" / "demo" / "report" / "report.md").read_text()
    assert "No pruning results" in md and "No analysis results" in md and "No lesion results" in md


def test_no_runs_says_what_it_looked_for(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="train_summary.json"):
        report_on(tmp_path, f"report.sweep={tmp_path / 'empty'}")
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


def test_every_section_reads_its_verdict_off_the_seeds(tmp_path):
    out = full_sweep(tmp_path, every=True)
    report_on(tmp_path)
    md = (out / "report.md").read_text()
    sec = {s.split("\n", 1)[0]: s for s in md.split("\n## ")[1:]}
    # definitions: the change's interval per row, matches_paper only where it excludes 0 on the paper's side
    defs = pd.read_csv(out / "definitions.csv")
    assert {"change_ci_lo", "change_ci_hi", "change_p"} <= set(defs.columns)
    falls = {"align_input_capture_task_info"}
    for r in defs.itertuples():
        side = r.change_ci_hi < 0 if r.quantity in falls else r.change_ci_lo > 0
        assert (r.matches_paper is True or r.matches_paper == "True") == (r.paper_direction != "not stated" and side)
    # post_bn is shown once where it equals pre_bn by construction, and the page says which "trained" is
    hull = defs[defs.quantity == "hull_size_mean"]
    assert "post_bn" not in set(hull.point) and hull[hull.point == "pre_bn"].note.str.contains("eval-mode BN").all()
    assert "post_bn" in set(defs[defs.quantity == "align_input_capture_task_info"].point)     # ρ is not invariant
    assert "Trained = best.ckpt" in sec["Do the conclusions depend on the definitions?"]
    # dynamics and the reference values: the last epoch, named; verdicts in words
    assert "Epochs 0 → 20" in sec["Training dynamics (H2)"] and "matches the paper" in sec["Training dynamics (H2)"]
    ref = pd.read_csv(out / "reference.csv")
    assert set(ref.trained_at) == {"epoch 20"} and ref.verdict.notna().all()
    assert not ref.verdict.str.startswith("not comparable").any()     # hulls of 3-4 under a cap of 10
    # the linear-Gaussian study is in the report, one draw per seed: its seeds differ, so it has an interval
    lg = pd.read_csv(out / "linear_gaussian.csv")
    assert not lg.identical.any() and np.isfinite(lg.change_ci_lo).all()
    assert "The linear-Gaussian study (METHODS §5)" in sec


def test_reference_marks_a_capped_hull_not_comparable(tmp_path):
    out = full_sweep(tmp_path, every=True, hull_cap=10.0)     # every layer's hull at the default hull_max
    report_on(tmp_path)
    ref = pd.read_csv(out / "reference.csv").set_index("quantity")
    for q in ("hull_size_mean", "hull_saturated_frac"):
        assert ref.loc[q, "verdict"].startswith("not comparable at this setting"), ref.loc[q, "verdict"]
        assert "metrics.hull_max" in ref.loc[q, "verdict"] and "6 of 6 layers" in ref.loc[q, "verdict"]
    assert not ref.loc["s3_s2", "verdict"].startswith("not comparable")
    assert "not comparable at this setting" in (out / "report.md").read_text()


def test_reference_verdicts_by_hand():
    from axes_pipeline.report.tables import reference_verdict
    from axes_pipeline.stats import across_seeds

    paper = (3.08, 4.27)
    ours = {"init": across_seeds([3.0, 3.1, 3.2]), "trained": across_seeds([4.2, 4.3, 4.25])}
    change = across_seeds([1.2, 1.2, 1.05])
    assert reference_verdict(ours, change, paper).startswith("consistent")
    far = {"init": across_seeds([9.0, 9.1, 9.2]), "trained": across_seeds([9.5, 9.6, 9.55])}
    assert reference_verdict(far, across_seeds([0.5, 0.5, 0.35]), paper) == "same direction (rises), other magnitude"
    assert reference_verdict(far, across_seeds([-0.5, -0.4, -0.45]), paper) == "different"
    assert reference_verdict(far, change, paper, "capped").startswith("not comparable at this setting: capped")


def test_lesion_section_pools_seeds_by_their_estimates(tmp_path):
    from scipy import stats as st

    from axes_pipeline.report.build import fmt, fmt_ci

    out = full_sweep(tmp_path)
    report_on(tmp_path)
    md = (out / "report.md").read_text()
    section = md.split("## Lesions and peer replacement", 1)[1].split("\n## ", 1)[0]
    # the pooled ΔR² of seeds 1, 2, 3 is 0.035, 0.040, 0.045: its Student t interval over the seeds
    d = np.array([0.035, 0.040, 0.045])
    half = st.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    assert fmt_ci(d.mean() - half, d.mean() + half) in section
    # never an average of the seeds' own intervals or p-values: not the mean F-test p (0.210) nor the
    # mean bootstrap CI ([0.0200, 0.0800]); the F-tests are counted instead
    assert fmt(np.mean([0.324, 0.176, 0.13])) not in section and "0.21" not in section
    assert fmt_ci(d.mean() / 2, 2 * d.mean()) not in section
    assert "0 of 3" in section
    les = pd.read_csv(out / "lesions.csv")
    assert not les["quantity"].str.contains(r"\.(?:ci_lo|ci_hi|ci_adj_lo|ci_adj_hi|p_f)$").any()
    row = les.set_index("quantity").loc["incremental_r2.pooled.delta_r2"]
    assert row.ci_lo == pytest.approx(d.mean() - half) and row.seeds == 3
    seeds = pd.read_csv(out / "lesions_per_seed.csv")
    assert sorted(seeds.loc[seeds.quantity == "incremental_r2.pooled.p_f", "value"]) == [0.13, 0.176, 0.324]
    # the direction check of METHODS §8 is shown, with its verdict, and the two scales are explained
    assert "Direction check" in section and "no clear relation" in section and "rank scale fits" in section


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
    report_on(tmp_path)
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
    assert "ΔR²" in html and "95% t CI" in html and "ρ within I_T bins" in html and "Recovery" in html
    assert "incremental_r2.pooled" not in html and "incremental_r2.pooled" not in md
    assert "incremental_r2.pooled.ci_adj_hi" in set(pd.read_csv(out / "lesions_per_seed.csv")["quantity"])
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
    report_on(tmp_path)
    assert (out / "report.html").read_text() == html and (out / "report.md").read_text() == md


def test_report_ci_choice(tmp_path):
    for s in (1, 2, 3):
        fake_run(tmp_path, s, local_gain=0.05)
    with pytest.raises(UserError, match="report.ci must be one of t, bca, percentile"):
        report_on(tmp_path, "report.ci=studentized")
    out = tmp_path / "multirun" / "demo" / "report"
    report_on(tmp_path)
    head = pd.read_csv(out / "headline.csv")
    assert (head.ci_method == "t").all()
    # the sentence under the forest plot names the interval
    assert "paired Student t 95% CI" in (out / "report.md").read_text()
    report_on(tmp_path, "report.ci=percentile")
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
    # taylor and random in full weight (the references a reader looks for), every other score faded
    assert styles["input_capture"]["lw"] < styles["random"]["lw"] < 3.0
    assert styles["random"]["alpha"] == 1.0 and styles["input_capture"]["alpha"] < 0.5


def test_backbones_side_by_side(tmp_path):
    # two backbones of one report: one headline row each, and the page's table with a column per backbone
    for s in (1, 2, 3):
        fake_run(tmp_path, s, local_gain=0.05)
        fake_run(tmp_path, s, local_gain=0.0, model="vgg16")
    report_on(tmp_path)
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


def test_linear_gaussian_study_follows_the_run_seed(tmp_path):
    from types import SimpleNamespace

    from axes_pipeline.analyses.linear_study import run_linear_gaussian
    from axes_pipeline.analyses.settings import LinearGaussianAnalysis

    block = LinearGaussianAnalysis(steps=50, eval_every=25)
    assert block.seed is None                     # the default: the run's seed, not one draw for every seed
    heads = {}
    for seed in (1, 2):
        out = tmp_path / f"seed{seed}"
        out.mkdir()
        ctx = SimpleNamespace(inputs=SimpleNamespace(id=SimpleNamespace(seed=seed)), out=out,
                              knobs=SimpleNamespace(plots=False), tracker=SimpleNamespace(table=lambda *a: None))
        heads[seed] = run_linear_gaussian(ctx, block)
    assert heads[1]["seed"] == 1 and heads[2]["seed"] == 2 and heads[1]["rho_init"] != heads[2]["rho_init"]
    # a seed given explicitly is used as it is, by every run
    out = tmp_path / "fixed"
    out.mkdir()
    ctx = SimpleNamespace(inputs=SimpleNamespace(id=SimpleNamespace(seed=2)), out=out,
                          knobs=SimpleNamespace(plots=False), tracker=SimpleNamespace(table=lambda *a: None))
    assert run_linear_gaussian(ctx, LinearGaussianAnalysis(steps=50, eval_every=25, seed=1)) == heads[1]


def test_curves_start_at_the_unpruned_point_and_draw_chance(tmp_path, monkeypatch):
    import axes_pipeline.report.figures as figures

    seen = {}
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: seen.setdefault("fig", fig) and path)
    rows = [{"group": "g", "score": s, "axis": a, "target": t, "achieved_flops_mean": t, "acc_mean": acc * t,
             "acc_sd": 0.01, "seeds": 3}
            for s, a, acc in (("input_capture", "local", 0.9), ("task_info", "target", 0.8), ("random", "baseline", 0.5),
                              ("l1", "baseline", 0.6))
            for t in (0.9, 0.5, 0.1)]
    figures.pruning_curves(pd.DataFrame(rows), "g", tmp_path / "c.png", best={"local": "input_capture",
                                                                            "target": "task_info"},
                           unpruned=0.95, chance=0.1)
    ax = seen["fig"].axes[0]
    lines = {ln.get_label(): ln for ln in ax.lines}
    for label in ("input_capture (best local)", "task_info (best target)", "random", "l1"):
        x, y = lines[label].get_data()
        assert x[0] == 0.0 and y[0] == 0.95, label              # every curve starts at the unpruned network
    assert lines["random"].get_alpha() == 1.0 and lines["l1"].get_alpha() < 0.5
    assert any(ln.get_ydata()[0] == 0.1 and ln.get_linestyle() == ":" for ln in ax.lines)   # chance, reached here
    # where the best local and best target still separate (mean gap > the sum of their SDs): not at 90% removed
    from axes_pipeline.report.build import separating_range

    line = separating_range(pd.DataFrame(rows), "g", {"local": "input_capture", "target": "task_info"})
    assert "removed FLOPs 0.100, 0.500 (of 0.100, 0.500, 0.900)" in line
