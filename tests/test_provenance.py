"""Issue 23, items 1-4: every table, plot and summary records what produced it, and every consumer
checks that before it uses, pools or overwrites it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from axes_pipeline.analyses.analyze import run_analysis
from axes_pipeline.errors import UserError
from axes_pipeline.runs import file_digest, read_json

from .helpers import inputs, make_cfg, restore, run_entry
from .test_analyze import SMALL
from .test_report import _report, fake_run

# the axes alone, small: no gradients, one null shuffle
LEAN = [*SMALL, "gradients.enabled=false"]


def _copy_run(tiny_run, name: str) -> tuple[Path, list[str], Path]:
    """A private finished copy of the tiny run (every epoch checkpoint kept): (root, overrides, run dir)."""
    root, overrides = tiny_run
    src = Path(make_cfg("analyze", overrides, root).paths.run_dir)
    over = [*overrides, *LEAN, f"name={name}"]
    dst = Path(make_cfg("analyze", over, root).paths.run_dir)
    dst.mkdir(parents=True)
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    for f in ("train_summary.json", "train_settings.json"):
        shutil.copy2(src / f, dst / f)
    return root, over, dst


# ------------------------------------------------------------------ item 1: another checkpoint


def test_another_checkpoint_writes_its_own_folder(tiny_run):
    """The issue's case: analyze.py ckpt=<run>/checkpoints/epoch_000.ckpt replaced the trained run's axes.csv."""

    root, over, run = _copy_run(tiny_run, "prov-ckpt")
    run_analysis(make_cfg("analyze", [*over, "plots=false"], root))
    trained_axes = (run / "analyze" / "axes.csv").read_bytes()
    early = run / "checkpoints" / "epoch_000.ckpt"
    summary = run_analysis(make_cfg("analyze", [*over, "plots=false", f"ckpt={early}"], root))
    assert (run / "analyze" / "axes.csv").read_bytes() == trained_axes          # untouched
    own = run / "analyze@epoch_000"
    assert read_json(own / "axes_fingerprint.json")["ckpt_digest"] == file_digest(early)
    assert summary["checkpoint_digest"] == file_digest(early)
    assert read_json(run / "analyze" / "axes_fingerprint.json")["ckpt_digest"] == file_digest(run / "checkpoints" / "best.ckpt")
    # the default checkpoint named explicitly is the default: same folders; prune follows the same rule
    best = restore(make_cfg("prune", [*over, f"ckpt={run / 'checkpoints' / 'best.ckpt'}"], root))
    assert best.stage_dir("analyze") == run / "analyze" and best.stage_dir("prune") == run / "prune"
    other = restore(make_cfg("prune", [*over, f"ckpt={run / 'checkpoints' / 'last.ckpt'}"], root))
    assert other.stage_dir("prune") == run / "prune@last"


def test_prune_of_another_checkpoint_reads_and_writes_its_own_folders(tiny_run):
    from axes_pipeline.pruning.run import run_prune

    root, over, run = _copy_run(tiny_run, "prov-prune")
    early = run / "checkpoints" / "epoch_001.ckpt"
    cfg = make_cfg("prune", [*over, f"ckpt={early}", "pruning.latency=false", "pruning.scores=[input_capture,l1]",
                             "pruning.targets=[0.9,0.8]", "pruning.eval_samples=64"], root)
    summary = run_prune(cfg)
    assert len(list((run / "prune@epoch_001").glob("*/prune_summary.json"))) == 1 and not (run / "prune").exists()
    assert summary["checkpoint_digest"] == file_digest(early)
    # no analyze@epoch_001 table existed: prune computed the axes into its own place, never analyze's
    assert Path(summary["axes_from"]) == run / "prune@epoch_001" / "axes"
    assert not (run / "analyze").exists() and not (run / "analyze@epoch_001").exists()


def _fingerprint(seed: int, **over) -> dict:
    return {"data.name": "digits", "data.split_seed": 0, "capture.n_cal": 1000, "metrics.ridge": 1e-6,
            "ckpt_digest": f"{seed:016x}", **over}


def test_report_says_when_axes_and_pruning_come_from_different_checkpoints(tmp_path):
    for s in (1, 2, 3):
        run = fake_run(tmp_path, s, local_gain=0.02)
        (run / "analyze" / "axes.csv").write_text("layer,channel\nconv1,0\n")
        (run / "analyze" / "axes_fingerprint.json").write_text(json.dumps(_fingerprint(s)))
        prune = json.loads((run / "prune" / "default" / "prune_summary.json").read_text())
        prune["checkpoint_digest"] = f"{s:016x}" if s != 2 else "e" * 16      # seed 2: epoch-0 axes
        (run / "prune" / "default" / "prune_summary.json").write_text(json.dumps(prune))
    _, summary = _report(tmp_path)
    bad = [n for n in summary["notices"] if "different checkpoints" in n]
    assert len(bad) == 1 and "seed 2" in bad[0]
    out = tmp_path / "multirun" / "demo" / "report"
    assert "different checkpoints" in (out / "report.md").read_text()


# ------------------------------------------------------------------ item 2: the split it was trained on


@pytest.mark.parametrize("stage", ["analyze", "prune"])
def test_another_split_is_refused(tiny_run, stage):
    """The issue's case: prune.py data.split_seed=3 on a run trained with split_seed=0 evaluated on training images."""

    root, overrides = tiny_run
    with pytest.raises(UserError, match=r"trained on other data \(data.split_seed: 0 -> 3\)"):
        restore(make_cfg(stage, [*overrides, *LEAN, "data.split_seed=3"], root))
    with pytest.raises(UserError, match=r"data.val_fraction"):
        restore(make_cfg(stage, [*overrides, *LEAN, "data.val_fraction=0.3"], root))
    restore(make_cfg(stage, [*overrides, *LEAN, "data.num_workers=0"], root))   # how, not which: accepted


def test_another_split_cli_one_line_before_any_work(tiny_run):
    root, overrides = tiny_run
    run = Path(make_cfg("prune", overrides, root).paths.run_dir)
    def results():   # what the stages wrote (Hydra's own .hydra/, <stage>.log and the failure marker aside)
        return sorted(p.name for p in run.iterdir() if p.name != ".hydra" and p.suffix not in (".log", ".failed"))

    before = results()
    res = run_entry("prune.py", *overrides, "data.split_seed=3", "pruning.latency=false", cwd=root)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "data.split_seed: 0 -> 3" in last
    assert results() == before                                                  # nothing written


# ------------------------------------------------------------------ item 3: pool only equal fingerprints


def test_report_never_pools_seeds_analysed_differently(tmp_path):
    for s in (1, 2, 3, 4):
        run = fake_run(tmp_path, s, local_gain=0.02)
        fp = _fingerprint(s, **({"capture.n_cal": 300} if s in (3, 4) else {}))
        (run / "analyze" / "axes_fingerprint.json").write_text(json.dumps(fp))
    _, summary = _report(tmp_path)
    note = [n for n in summary["notices"] if "analysed with different settings" in n]
    assert len(note) == 1 and "capture.n_cal: 1000 -> 300" in note[0] and "2 separate groups" in note[0]
    layers = pd.read_csv(tmp_path / "multirun" / "demo" / "report" / "layers.csv")
    assert layers["group"].nunique() == 2 and (layers["seeds"] == 2).all()
    # the pruning tables are not split by it (the curves' own protocol decides that)
    per_seed = pd.read_csv(tmp_path / "multirun" / "demo" / "report" / "flops_auc_per_seed.csv")
    assert per_seed["group"].nunique() == 1


def test_report_pools_seeds_whose_fingerprints_differ_only_in_the_checkpoint(tmp_path):
    for s in (1, 2, 3):
        run = fake_run(tmp_path, s, local_gain=0.02)
        (run / "analyze" / "axes_fingerprint.json").write_text(json.dumps(_fingerprint(s)))
    _, summary = _report(tmp_path)
    assert not [n for n in summary["notices"] if "analysed" in n]
    layers = pd.read_csv(tmp_path / "multirun" / "demo" / "report" / "layers.csv")
    assert layers["group"].nunique() == 1 and (layers["seeds"] == 3).all()


# ------------------------------------------------------------------ item 4: one fingerprint per table, plots, summary


def test_prune_never_rewrites_analyze_tables_under_other_settings(tiny_run):
    """The issue's case: analyze.py capture.n_cal=300, then prune (another n_cal) rewrote axes.csv/layers.csv."""
    from axes_pipeline.axes.table import stage_axes

    root, over, run = _copy_run(tiny_run, "prov-stage")
    run_analysis(make_cfg("analyze", [*over, "plots=false", "capture.n_cal=200"], root))
    kept = {f: (run / "analyze" / f).read_bytes() for f in ("axes.csv", "layers.csv", "axes_fingerprint.json")}
    cfg = make_cfg("prune", [*over, "capture.n_cal=240"], root)
    trained = restore(cfg)
    table, folder, fp = stage_axes(inputs(cfg).knobs, trained, run / "prune" / "axes")
    assert folder == run / "prune" / "axes" and fp["capture.n_cal"] == 240
    assert {f: (run / "analyze" / f).read_bytes() for f in kept} == kept
    assert read_json(folder / "axes_fingerprint.json") == fp and len(table)
    # the same settings as analyze's: analyze's table is read, nothing is written
    cfg = make_cfg("prune", [*over, "capture.n_cal=200"], root)
    assert stage_axes(inputs(cfg).knobs, restore(cfg), run / "prune" / "axes")[1] == run / "analyze"


def test_plots_and_summary_carry_the_table_fingerprint(tiny_run):
    root, over, run = _copy_run(tiny_run, "prov-plots")
    plots = run / "analyze" / "plots"
    first = run_analysis(make_cfg("analyze", over, root))
    want = read_json(run / "analyze" / "axes_fingerprint.json")
    assert read_json(plots / "fingerprint.json") == want == first["axes"]["fingerprint"]
    assert read_json(run / "analyze" / "analyze_summary.json")["axes"]["fingerprint"] == want
    # plots drawn from another table (their fingerprint differs): redrawn, with the table
    (plots / "fingerprint.json").write_text(json.dumps({**want, "capture.n_cal": 1}))
    again = run_analysis(make_cfg("analyze", over, root))
    assert not again["axes"].get("reused") and read_json(plots / "fingerprint.json") == want
    assert run_analysis(make_cfg("analyze", over, root))["axes"]["reused"]         # current: reused
    # the table recomputed under other settings without plots: the old plots go, they describe the old table
    other = run_analysis(make_cfg("analyze", [*over, "plots=false", "capture.n_cal=200"], root))
    assert other["axes"]["fingerprint"]["capture.n_cal"] == 200
    assert not (plots / "fingerprint.json").exists() and not (plots / "scatter_ix_it.png").exists()
    assert read_json(run / "analyze" / "analyze_summary.json")["axes"]["fingerprint"]["capture.n_cal"] == 200


def test_checkpoints_are_verified_against_their_training_digest(tiny_run, tmp_path):
    """Issue 23: training records every checkpoint's content digest (train_summary.json); a later read of a
    checkpoint that loads but is not the file training wrote stops in one line, and so does the skip check."""
    from axes_pipeline.training.checkpoints import changed_since_training
    from axes_pipeline.training.train import check_complete

    root, overrides = tiny_run
    mine = tmp_path / "root"
    shutil.copytree(root, mine, ignore=shutil.ignore_patterns("analyze", "prune"))
    run = mine / "runs" / "default" / "digits-resnet18-w0.125" / "seed42"
    digests = read_json(run / "train_summary.json")["checkpoint_digests"]
    assert {"best.ckpt", "last.ckpt", "epoch_000.ckpt"} <= set(digests)
    assert digests["best.ckpt"] == file_digest(run / "checkpoints" / "best.ckpt")   # a copy keeps its digest
    assert changed_since_training(run / "checkpoints" / "best.ckpt") is None
    # another checkpoint of the same run put in best.ckpt's place: it loads, but it is not what was trained
    shutil.copy(run / "checkpoints" / "epoch_000.ckpt", run / "checkpoints" / "best.ckpt")
    assert "is not the file training wrote" in changed_since_training(run / "checkpoints" / "best.ckpt")
    with pytest.raises(UserError, match="is not the file training wrote"):
        restore(make_cfg("analyze", overrides, mine))
    with pytest.raises(UserError, match="is not the file training wrote"):
        check_complete(run, 3)
