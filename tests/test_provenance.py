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

from .helpers import SMALL, fake_run, inputs, make_cfg, report_on, restore, run_entry

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
    _, summary = report_on(tmp_path)
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
    _, summary = report_on(tmp_path)
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
    _, summary = report_on(tmp_path)
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


# ------------------------------------------------------------------ issue 31: the chain of a result


THREE = "capture.layers=[conv1,layer1.0.conv1,layer1.0.conv2]"
NULL = "analysis.propagation.null_draws=2"


def test_an_analysis_of_older_axes_is_marked_stale_and_refused_by_the_report(tiny_run, caplog):
    """Case 1: ``analysis=[axes,propagation]``, then ``analysis=axes`` under another capture: propagation.csv was
    computed from the old axes. Analyze keeps it but marks it stale (not merged as current), the report leaves it
    out naming the file and the command; running propagation again recomputes it and the chain holds again."""
    import logging

    from axes_pipeline.layout import analysis_inputs
    from axes_pipeline.report.collect import discover, skipped_inputs

    root, over, run = _copy_run(tiny_run, "prov-chain")
    over = [*over, "plots=false", THREE]
    first = run_analysis(make_cfg("analyze", [*over, "analysis=[axes,propagation]", NULL], root))
    out = run / "analyze"
    record = read_json(out / "propagation_inputs.json")
    want = read_json(out / "axes_fingerprint.json")
    assert want == first["axes"]["fingerprint"] and record["fingerprint"] == analysis_inputs(want)
    assert read_json(out / "analyze_summary.json")["propagation"]["pairs"] == 2

    with caplog.at_level(logging.WARNING, logger="axes_pipeline"):
        run_analysis(make_cfg("analyze", [*over, "analysis=axes", "capture.samples_per_image=2"], root))
    notes = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert len(notes) == 1 and "propagation.csv" in notes[0] and "analysis=propagation" in notes[0]
    summary = read_json(out / "analyze_summary.json")
    assert "propagation" not in summary and "propagation" not in summary["analyses"]
    assert summary["stale"]["propagation"]["headline"]["pairs"] == 2 and (out / "propagation.csv").is_file()   # kept
    runs = discover([run.parent])
    assert runs[0].read_csv("analyze/propagation.csv") is None
    why = {s["file"]: s["reason"] for s in skipped_inputs(runs)}["analyze/propagation.csv"]
    assert str(out / "propagation.csv") in why and "analysis=propagation" in why and "python analyze.py" in why

    again = run_analysis(make_cfg("analyze", [*over, "analysis=propagation", NULL, "capture.samples_per_image=2"], root))
    assert again["propagation"]["pairs"] == 2
    summary = read_json(out / "analyze_summary.json")
    assert "stale" not in summary and "propagation" in summary["analyses"]
    runs = discover([run.parent])
    assert runs[0].read_csv("analyze/propagation.csv") is not None and not skipped_inputs(runs)


def _chained(run: Path, axes_fp: dict, recorded: dict | None) -> None:
    """A fake run's analyze/ holding axes.csv's fingerprint and a lesion table recorded with ``recorded``."""
    from axes_pipeline.layout import analysis_inputs
    from axes_pipeline.runs import write_json, write_record

    write_json(run / "analyze" / "axes_fingerprint.json", axes_fp)
    (run / "analyze" / "axes.csv").write_text("layer,channel\n")
    pd.DataFrame({"layer": ["conv1"], "channel": [0], "damage_loss": [0.1]}).to_csv(run / "analyze" / "lesions.csv")
    write_json(run / "analyze" / "lesion_summary.json", {"layers": 1})
    if recorded is not None:
        write_record(run / "analyze" / "lesion_inputs.json", {"analysis": "lesion"}, analysis_inputs(recorded))


def test_report_refuses_analysis_tables_of_other_axes(tmp_path):
    """Case 1, the report's side (fast, fake runs): a lesion table recorded with other axes than the run's
    axes.csv, or recording none, is left out and listed; one recorded with the run's axes is read."""
    fp = _fingerprint(1)
    good, other, bare = (fake_run(tmp_path, s, local_gain=0.0) for s in (1, 2, 3))
    _chained(good, fp, fp)
    _chained(other, fp, {**fp, "capture.point": "post_act"})
    _chained(bare, fp, None)
    cfg, summary = report_on(tmp_path)
    skipped = {(s["seed"], s["file"]): s["reason"] for s in summary["skipped"]}
    assert (1, "analyze/lesion_summary.json") not in skipped
    f = "analyze/lesion_summary.json"   # what the report reads of the lesion analysis
    for seed in (2, 3):
        assert "was not computed from the run's axes.csv" in skipped[(seed, f)]
        assert "python analyze.py" in skipped[(seed, f)] and "analysis=lesion" in skipped[(seed, f)]
    assert "axes.csv.capture.point: post_act -> (absent)" in skipped[(2, f)]
    assert "lesion_inputs.json is missing" in skipped[(3, f)]


def test_a_copied_seed_is_counted_once_and_two_networks_of_one_seed_are_refused(tmp_path):
    """Case 3: a backup copy of a seed folder inside the sweep (same checkpoint digest) is counted once; the
    same seed with another network (another digest), e.g. from a second root, is refused, never pooled."""
    from axes_pipeline.report.collect import discover

    runs = [fake_run(tmp_path, s, local_gain=0.05) for s in (1, 2, 3)]
    for r in runs:   # training records its checkpoints' digests
        summary = read_json(r / "train_summary.json")
        (r / "train_summary.json").write_text(json.dumps({**summary, "checkpoint_digests": {"best.ckpt": f"{r.name}aaaa"}}))
    shutil.copytree(runs[0], runs[0].parent / "seed1-backup")
    skipped: list[dict] = []
    found = discover([tmp_path / "multirun" / "demo"], skipped)
    assert sorted(r.seed for r in found) == [1, 2, 3]
    assert len(skipped) == 1 and "an exact copy of" in skipped[0]["reason"] and skipped[0]["seed"] == 1
    _, summary = report_on(tmp_path)
    assert summary["headline"] and all(row["n"] == 3 for row in summary["headline"])

    second = tmp_path / "second"
    other = fake_run(second, 2, local_gain=0.0)    # another seed-2 network
    s2 = read_json(other / "train_summary.json")
    (other / "train_summary.json").write_text(json.dumps({**s2, "checkpoint_digests": {"best.ckpt": "bbbbbbbbbbbb"}}))
    skipped = []
    found = discover([tmp_path / "multirun" / "demo", second], skipped)
    assert sorted(r.seed for r in found) == [1, 3]
    refused = [s for s in skipped if s["seed"] == 2]
    assert len(refused) == 2 and all("2 different networks" in s["reason"] and "never pooled" in s["reason"] for s in refused)


def test_dynamics_names_the_epochs_without_a_checkpoint(tiny_run, capsys, caplog):
    """Case 7: with epoch_001.ckpt deleted, dynamics reported "3 epochs" as if complete; now the log, the
    summary and the report name epoch 1."""
    import logging

    from axes_pipeline.report.collect import chain_notices, discover, group_runs

    root, over, run = _copy_run(tiny_run, "prov-dyn")
    (run / "checkpoints" / "epoch_001.ckpt").unlink()
    cfg = make_cfg("analyze", [*over, "plots=false", "analysis=dynamics", "capture.layers=[conv1]",
                               "analysis.dynamics.layers=[conv1]"], root)
    with caplog.at_level(logging.WARNING, logger="axes_pipeline"):
        head = run_analysis(cfg)["dynamics"]
    assert head["missing_epochs"] == {"42": [1]} and head["epochs"] == 3
    assert "no checkpoint for seed 42: epoch 1" in capsys.readouterr().out
    assert any("epoch 1" in r.getMessage() and "no checkpoint" in r.getMessage() for r in caplog.records)
    assert read_json(run / "analyze" / "analyze_summary.json")["dynamics"]["missing_epochs"] == {"42": [1]}
    groups, _ = group_runs(discover([run.parent]))
    assert any("no checkpoint for epoch 1" in n for n in chain_notices(groups))


def test_training_records_its_environment(tiny_run):
    """Case 5: the environment that shapes the weights is recorded at train time."""
    root, overrides = tiny_run
    run = Path(make_cfg("train", overrides, root).paths.run_dir)
    env = read_json(run / "train_summary.json")["environment"]
    assert env == read_json(run / "environment.json")
    assert env["threads"] >= 1 and env["processor"] and env["torch"] and env["build_digest"]
    assert {"deterministic_algorithms", "cudnn_deterministic", "cuda_device", "blas", "onednn"} <= set(env)


def test_the_summary_moves_stale_analyses_aside_and_back(tmp_path):
    """Case 1, analyze_summary.json: a stale analysis' figures move under ``stale`` (kept, never current) and
    come back once the axes they were computed from are current again."""
    from axes_pipeline.analyses.analyze import _merged
    from axes_pipeline.runs import write_json

    path = tmp_path / "analyze_summary.json"
    write_json(path, {"analyses": ["axes", "lesion"], "axes": {"layers": 3}, "lesion": {"delta_r2": 0.1}})
    now = {"analyses": ["axes"], "axes": {"layers": 3, "fingerprint": {"capture.point": "post_act"}}}
    merged = _merged(path, now, {"lesion": "lesions.csv ... stale"})
    assert "lesion" not in merged and merged["analyses"] == ["axes"]
    assert merged["stale"] == {"lesion": {"why": "lesions.csv ... stale", "headline": {"delta_r2": 0.1}}}
    write_json(path, merged)
    again = _merged(path, now, {"lesion": "still stale"})            # kept across calls
    assert again["stale"]["lesion"]["headline"] == {"delta_r2": 0.1}
    write_json(path, again)
    back = _merged(path, {"analyses": ["axes"], "axes": {"layers": 3}}, {})   # the old axes are current again
    assert back["lesion"] == {"delta_r2": 0.1} and "stale" not in back and back["analyses"] == ["axes", "lesion"]


def test_dynamics_of_another_seed_is_recorded_only_against_axes_of_the_same_knobs(tmp_path):
    """Case 1 with ``dynamics.seeds``: the dynamics.csv written into another seed's folder is recorded against that
    seed's axes.csv when it was measured with the same knobs (only the checkpoint differs), never otherwise."""
    from axes_pipeline.analyses.dynamics import record_other_seed
    from axes_pipeline.layout import broken_chains
    from axes_pipeline.runs import write_json

    ours = _fingerprint(1)
    same, other = tmp_path / "same", tmp_path / "other"
    for folder, fp in ((same, _fingerprint(2)), (other, _fingerprint(2, **{"capture.point": "post_act"}))):
        folder.mkdir()
        write_json(folder / "axes_fingerprint.json", fp)
        (folder / "dynamics.csv").write_text("epoch,layer\n0,conv1\n")
        record_other_seed(folder, ours)
    assert broken_chains(same, _fingerprint(2)) == {}
    assert not (other / "dynamics_inputs.json").exists()
    assert "dynamics" in broken_chains(other, read_json(other / "axes_fingerprint.json"))
