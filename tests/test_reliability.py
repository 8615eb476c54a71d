"""Issue 10, items 1, 2, 3, 8: caches keyed on everything they depend on, damaged inputs caught,
a report that never destroys the last good one, partly trained runs refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from axes_pipeline.analyses.analyze import run_analysis
from axes_pipeline.errors import UserError
from axes_pipeline.runs import read_json
from axes_pipeline.tables import DamagedTable

from .helpers import SMALL, fake_run, inputs, make_cfg, report_on, restore, run_entry, write_cifar10


def _analyze_cfg(tiny_run, *extra):
    root, overrides = tiny_run
    return make_cfg("analyze", [*overrides, *SMALL, *extra], root)


def _ckpt(tiny_run) -> Path:
    return Path(_analyze_cfg(tiny_run).paths.run_dir) / "checkpoints" / "best.ckpt"


# ------------------------------------------------------------------ item 1: keys and checkpoints


def test_checkpoint_records_its_data(tiny_run):
    meta = torch.load(_ckpt(tiny_run), map_location="cpu", weights_only=True)["axes_meta"]
    assert meta["data"] == "digits" and meta["image_size"] == 16 and meta["num_classes"] == 10


def test_checkpoint_of_another_dataset_is_refused(tiny_run, tmp_path):
    """The issue's case: data=cifar10 with a digits checkpoint (same class count) used to load."""

    write_cifar10(tmp_path / "data")
    cfg = _analyze_cfg(tiny_run, "data=cifar10", f"data.data_dir={tmp_path / 'data'}", "data.verify=false",
                       "data.num_workers=0", f"ckpt={_ckpt(tiny_run)}")
    with pytest.raises(UserError, match=r"is for data=digits, but this run has data=cifar10"):
        run_analysis(cfg)
    cfg = _analyze_cfg(tiny_run, "data.image_size=32")
    with pytest.raises(UserError, match=r"image_size=16, but this run has image_size=32"):
        restore(cfg)
    root, overrides = tiny_run
    res = run_entry("analyze.py", *overrides, *SMALL, "data=cifar10", f"data.data_dir={tmp_path / 'data'}",
                    "data.verify=false", "data.num_workers=0", f"ckpt={_ckpt(tiny_run)}", cwd=root)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: checkpoint ") and "data=digits" in res.stderr


def test_old_checkpoint_without_data_is_accepted_with_a_warning(caplog):
    from axes_pipeline.training.checkpoints import check_meta

    want = {"model": "resnet18", "num_classes": 10, "data": "digits", "image_size": 16}
    with caplog.at_level("WARNING", logger="axes_pipeline"):
        check_meta({"model": "resnet18", "num_classes": 10}, want, "old.ckpt")
    assert "does not record its data and image_size" in caplog.text
    with pytest.raises(UserError, match="data=cifar10"):
        check_meta({"model": "resnet18", "data": "cifar10"}, want, "other.ckpt")


def test_every_key_holds_the_data_identity_and_the_checkpoint_content(tiny_run, tmp_path):
    from axes_pipeline.analyses.lesions import lesion_settings, part_settings
    from axes_pipeline.analyses.settings import LesionAnalysis
    from axes_pipeline.axes import table

    def axes_fingerprint(c, k):
        return table.axes_fingerprint(inputs(c).knobs, inputs(c).data_id, k)

    def capture_identity(c, k):
        return table.capture_identity(inputs(c).knobs, inputs(c).data_id, k)

    def lesion_key(c, k):   # what the lesion parts' stamp holds
        return {**axes_fingerprint(c, k), **part_settings(lesion_settings(LesionAnalysis()), 100)}

    base = _analyze_cfg(tiny_run)
    ckpt = _ckpt(tiny_run)
    copy = tmp_path / "copy.ckpt"
    shutil.copy(ckpt, copy)
    for fn in (axes_fingerprint, capture_identity,
               lesion_key):
        want = fn(base, ckpt)
        assert fn(base, copy) == want                       # a copied checkpoint keeps its key
        for extra in ("data.split_seed=7", "data.image_size=32", "data.val_fraction=0.2"):
            assert fn(_analyze_cfg(tiny_run, extra), ckpt) != want, extra
        assert fn(_analyze_cfg(tiny_run, "data.batch_size=32"), ckpt) == want   # loading only: same key
    other = tmp_path / "other.ckpt"
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    blob["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    torch.save(blob, other)
    assert axes_fingerprint(base, other)["ckpt_digest"] != axes_fingerprint(base, ckpt)["ckpt_digest"]


def test_changed_split_seed_is_refused_and_keeps_the_axes(tiny_run):
    """Another split than the run was trained on is refused (issue 23 item 2), so it never replaces the axes."""
    cfg = _analyze_cfg(tiny_run, "plots=false")
    run_analysis(cfg)
    out = Path(cfg.paths.run_dir) / "analyze"
    stamp = (out / "axes.csv").stat().st_mtime_ns
    with pytest.raises(UserError, match=r"data.split_seed: 0 -> 7"):
        run_analysis(_analyze_cfg(tiny_run, "plots=false", "data.split_seed=7"))
    assert (out / "axes.csv").stat().st_mtime_ns == stamp
    assert read_json(out / "axes_fingerprint.json")["data.split_seed"] == 0    # the data identity is in the key


def test_capture_cache_checks_its_identity(tmp_path):
    from axes_pipeline.capture import Capture, load_capture, save_capture

    cap = Capture(acts={}, target=None, image_index=None, knobs={}, moments={"a": torch.eye(3, dtype=torch.float64)},
                  means={"a": torch.zeros(3, dtype=torch.float64)}, n=4)
    save_capture(cap, tmp_path / "c.pt", {"data.name": "digits", "ckpt_digest": "ab"})
    assert load_capture(tmp_path / "c.pt", {"data.name": "digits", "ckpt_digest": "ab"}) is not None
    assert load_capture(tmp_path / "c.pt", {"data.name": "cifar10", "ckpt_digest": "ab"}) is None
    (tmp_path / "c.pt").write_bytes(b"truncated")
    assert load_capture(tmp_path / "c.pt", {"data.name": "digits"}) is None


# ------------------------------------------------------------------ item 2: damaged tables


def _damage(path: Path, how: str) -> None:
    df = pd.read_csv(path)
    if how == "nan":
        df.loc[3, "task_info"] = np.nan
    elif how == "text":
        df["input_capture"] = df["input_capture"].astype(object)
        df.loc[0, "input_capture"] = "oops"
    elif how == "missing_column":
        df = df.drop(columns=["hull_size"])
    elif how == "truncated":
        df = df.iloc[: len(df) - 5]
    df.to_csv(path, index=False)


@pytest.mark.parametrize("how", ["nan", "text", "missing_column", "truncated"])
def test_damaged_axes_table_is_recomputed_with_a_note(tiny_run, how, capsys):
    cfg = _analyze_cfg(tiny_run, "plots=false")
    run_analysis(cfg)
    path = Path(cfg.paths.run_dir) / "analyze" / "axes.csv"
    good = pd.read_csv(path)
    _damage(path, how)
    summary = run_analysis(cfg)
    assert not summary["axes"].get("reused")
    assert "axes.csv is damaged" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(path), good)      # recomputed: the same seeded table


def test_prune_axes_read_recomputes_a_damaged_table(tiny_run):
    from axes_pipeline.axes.table import load_or_compute_axes

    cfg = _analyze_cfg(tiny_run, "plots=false")
    run_analysis(cfg)
    path = Path(cfg.paths.run_dir) / "analyze" / "axes.csv"
    _damage(path, "nan")
    axes = load_or_compute_axes(inputs(cfg).knobs, restore(cfg), progress=False)
    assert np.isfinite(axes["task_info"]).all() and np.isfinite(pd.read_csv(path)["task_info"]).all()


def test_lesion_on_axes_missing_a_column_is_one_line():
    from axes_pipeline.analyses.lesions import check_axes_columns

    axes = pd.DataFrame({"layer": ["a"], "channel": [0], "input_capture": [0.1]})
    with pytest.raises(DamagedTable, match=r"axes.csv lacks column\(s\) layer_index, hull_size") as err:
        check_axes_columns(axes, Path("run/analyze/axes.csv"))
    assert "\n" not in str(err.value) and isinstance(err.value, UserError)


def test_damaged_lesion_and_dynamics_parts_are_recomputed(tmp_path):
    from axes_pipeline.analyses.dynamics import _valid_part
    from axes_pipeline.analyses.lesions import _read_part

    part = pd.DataFrame({"layer": "conv1", "layer_index": 0, "channel": [0, 1, 2], "loss_lesion": [1.0, 1.1, 1.2],
                         "acc_lesion": 0.9, "loss_all": 1.0, "acc_all": 0.9, "loss_base": 1.0, "acc_base": 0.95})
    part.to_csv(tmp_path / "conv1.csv", index=False)
    assert _read_part(tmp_path / "conv1.csv", "conv1", 3, ["all"]) is not None
    assert _read_part(tmp_path / "conv1.csv", "conv1", 4, ["all"]) is None          # a row short
    part.assign(loss_all=[1.0, np.nan, 1.0]).to_csv(tmp_path / "conv1.csv", index=False)
    assert _read_part(tmp_path / "conv1.csv", "conv1", 3, ["all"]) is None          # NaN loss
    dyn = pd.DataFrame({"epoch": 1, "seed": 0, "layer": ["a", "b"], "layer_index": [0, 1], "channels": 4,
                        "hull_size_mean": [1.0, 2.0], "hull_saturated_frac": 0.0, "ckpt_digest": "x"})
    dyn.to_csv(tmp_path / "epoch_001.csv", index=False)
    assert _valid_part(tmp_path / "epoch_001.csv", None, ["a", "b"]) is not None
    assert _valid_part(tmp_path / "epoch_001.csv", None, ["a", "b", "c"]) is None    # a layer missing
    dyn.drop(columns=["ckpt_digest"]).to_csv(tmp_path / "epoch_001.csv", index=False)
    assert _valid_part(tmp_path / "epoch_001.csv", None, ["a", "b"]) is None         # an older part


# ------------------------------------------------------------------ item 2/3: the report


def _break(run: Path, how: str) -> None:
    if how == "truncated_curves":
        text = (run / "prune" / "default" / "prune_curves.csv").read_text().splitlines()
        (run / "prune" / "default" / "prune_curves.csv").write_text("\n".join(text[:-3]) + "\n")
    elif how == "cut_mid_line":
        text = (run / "prune" / "default" / "prune_curves.csv").read_text()
        (run / "prune" / "default" / "prune_curves.csv").write_text(text[: text.rindex(",")])
    elif how == "layers_without_index":
        df = pd.read_csv(run / "analyze" / "layers.csv").drop(columns=["layer_index"])
        df.to_csv(run / "analyze" / "layers.csv", index=False)
    elif how == "text_in_numeric":
        df = pd.read_csv(run / "prune" / "default" / "prune_curves.csv")
        df["achieved_flops"] = df["achieved_flops"].astype(object)
        df.loc[2, "achieved_flops"] = "abc"
        df.to_csv(run / "prune" / "default" / "prune_curves.csv", index=False)
    elif how == "damaged_summary":
        (run / "train_summary.json").write_text('{"val_acc": 0.9, ')


@pytest.mark.parametrize("how,file", [("truncated_curves", "prune_curves.csv"), ("cut_mid_line", "prune_curves.csv"),
                                      ("layers_without_index", "layers.csv"), ("text_in_numeric", "prune_curves.csv"),
                                      ("damaged_summary", "train_summary.json")])
def test_report_lists_every_skipped_run(tmp_path, how, file):
    runs = [fake_run(tmp_path, s, local_gain=0.02) for s in (1, 2, 3, 4)]
    _break(runs[2], how)
    _, summary = report_on(tmp_path, "report.n_boot=200")
    out = tmp_path / "multirun" / "demo" / "report"
    [sk] = summary["skipped"]
    assert sk["file"].endswith(file) and sk["run"] == str(runs[2].resolve())
    assert read_json(out / "report_summary.json")["skipped"] == summary["skipped"]
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "## Skipped inputs" in md and file in md.split("## Skipped inputs")[1].split("##")[0]
    assert "Skipped inputs" in page and file in page
    if file == "prune_curves.csv":   # the damaged seed is not in the pruning tables
        assert set(pd.read_csv(out / "flops_auc_per_seed.csv")["seed"]) == {1, 2, 4}
    assert all(Path(p).is_file() for p in summary["inputs"])      # every input read, with its digest


def test_report_says_when_a_quantity_has_fewer_seeds(tmp_path):
    runs = [fake_run(tmp_path, s, local_gain=0.0) for s in (1, 2, 3)]
    lay = pd.read_csv(runs[0] / "analyze" / "layers.csv")
    lay["modularity_gap"] = np.nan        # undefined in one seed (legitimately NaN: not skipped)
    lay.to_csv(runs[0] / "analyze" / "layers.csv", index=False)
    report_on(tmp_path, "report.n_boot=200")
    out = tmp_path / "multirun" / "demo" / "report"
    table = pd.read_csv(out / "layers.csv")
    assert (table["seeds"] == 3).all() and (table["modularity_gap_n"] == 2).all()
    assert (table["s3_s2_n"] == 3).all()
    row = next(line for line in (out / "report.md").read_text().splitlines() if "| layer1.0.conv1 |" in line)
    assert "(n=2)" in row and row.count("(n=") == 1


def test_failed_report_leaves_the_previous_one(tmp_path, monkeypatch):
    from axes_pipeline.report import build

    for s in (1, 2, 3):
        fake_run(tmp_path, s, local_gain=0.02)
    report_on(tmp_path, "report.n_boot=200")
    out = tmp_path / "multirun" / "demo" / "report"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fake_run(tmp_path, 4, local_gain=0.02)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(build, "render_html", boom)      # fails after the tables and figures are written
    with pytest.raises(RuntimeError):
        report_on(tmp_path, "report.n_boot=200")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".report.tmp-")]
    monkeypatch.undo()
    _, summary = report_on(tmp_path, "report.n_boot=200")
    assert summary["groups"] and 4 in next(iter(summary["groups"].values()))
    assert (out / "report.md").read_bytes() != before["report.md"]


def test_report_removes_files_of_the_previous_report_it_no_longer_has(tmp_path):
    runs = [fake_run(tmp_path, s, local_gain=0.02) for s in (1, 2, 3)]
    report_on(tmp_path, "report.n_boot=200")
    out = tmp_path / "multirun" / "demo" / "report"
    assert (out / "alignment_depth.png").is_file()
    (out / "notes.txt").write_text("mine")
    for r in runs:
        shutil.rmtree(r / "analyze")
    report_on(tmp_path, "report.n_boot=200")
    assert not (out / "alignment_depth.png").exists() and not (out / "layers.csv").exists()
    assert (out / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------ item 8: partial runs


def _partial_run(tiny_run, name="partial") -> tuple[list[str], Path]:
    root, overrides = tiny_run
    src = Path(_analyze_cfg(tiny_run).paths.run_dir)
    over = [*overrides, *SMALL, f"name={name}"]
    dst = Path(make_cfg("analyze", over, root).paths.run_dir)
    (dst / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "checkpoints" / "last.ckpt", dst / "checkpoints" / "last.ckpt")   # killed: no summary
    return over, dst


def test_partial_run_is_refused_unless_allowed(tiny_run):

    root, _ = tiny_run
    over, dst = _partial_run(tiny_run)
    with pytest.raises(UserError, match=r"is not finished \(no train_summary.json.*allow_partial=true"):
        restore(make_cfg("analyze", over, root))
    with pytest.raises(UserError, match="allow_partial=true"):          # its checkpoint named directly
        restore(make_cfg("analyze", [*over, f"ckpt={dst / 'checkpoints' / 'last.ckpt'}"], root))
    trained = restore(make_cfg("analyze", [*over, "allow_partial=true"], root))
    assert trained.run_dir == dst


def test_partial_run_cli_one_line(tiny_run):
    root, _ = tiny_run
    over, dst = _partial_run(tiny_run, "partial_cli")
    res = run_entry("analyze.py", *over, "plots=false", cwd=root)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run ") and "allow_partial=true" in last and str(dst) in last
    assert not (dst / "analyze" / "axes.csv").exists()


def test_restoring_a_headline_run_never_fetches_imagenet_weights(tiny_run, monkeypatch, tmp_path):
    """A checkpoint overwrites every tensor, so analyze/prune of a `model.pretrained=true` run build
    the bare architecture: offline (no cached weights) they still work."""
    import axes_pipeline.models.weights as weights

    def offline(*a, **k):
        raise AssertionError("restoring a trained run tried to fetch ImageNet weights")

    monkeypatch.setattr(weights, "download_weights", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    cfg = _analyze_cfg(tiny_run, "model.pretrained=true")
    trained = restore(cfg)
    assert trained.meta["data"] == "digits"


def test_prune_reuses_the_axes_analyze_computed_from_a_whole_small_split(tiny_run, caplog):
    """capture.n_cal above the split means the whole split; analyze and prune must key axes.csv on
    the same fitted number, or each would recompute (and replace) the other's table."""
    import logging

    from axes_pipeline.axes.table import load_or_compute_axes

    big = ["capture.n_cal=100000", "capture.samples_per_image=2", "graphs.null_shuffles=1", "plots=false",
           "gradients.enabled=false"]
    root, overrides = tiny_run
    over, dst = _partial_run(tiny_run, name="fitted")                 # a private copy of the run ...
    shutil.copy(Path(_analyze_cfg(tiny_run).paths.run_dir) / "train_summary.json", dst)   # ... finished
    over = [*overrides, *big, "name=fitted"]
    run_analysis(make_cfg("analyze", over, root))
    cfg = make_cfg("analyze", over, root)
    with caplog.at_level(logging.INFO, logger="axes_pipeline"):
        load_or_compute_axes(inputs(cfg).knobs, restore(cfg), progress=False)
    assert not any("computing the two axes" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- issue 31: the chain of a result


@pytest.mark.parametrize("script", ["train.py", "analyze.py", "prune.py", "report.py"])
def test_wrong_interpreter_is_one_line(script, tmp_path):
    """Case 12: an interpreter without the project's packages (``-S``: no site-packages) gets one line
    saying how to install and which interpreter to use, exit 2, nothing written."""
    import subprocess
    import sys

    from .helpers import ROOT

    out = subprocess.run([sys.executable, "-S", str(ROOT / script), "seed=1"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "make install" in lines[0] and f".venv/bin/python {script}" in lines[0] and "omegaconf" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_prune_with_one_captured_layer_says_prune_needs_every_layer(tiny_run):
    """Case 9: ``prune.py capture.layers=<one layer>`` named prune's own table "damaged" and suggested an
    analyze command that would overwrite the run's full axes.csv; now one line, nothing destructive."""
    root, _ = tiny_run
    over, dst = _partial_run(tiny_run, name="one_layer")
    shutil.copy(Path(_analyze_cfg(tiny_run).paths.run_dir) / "train_summary.json", dst)
    res = run_entry("prune.py", *over, "capture.layers=conv1", "pruning.scores=[input_capture]", cwd=root)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "every prunable layer" in last and "capture.layers" in last and "without capture.layers" in last
    assert "recompute" not in last and "damaged" not in last and "analyze.py" not in last
    assert not (dst / "prune").exists() and not (dst / "analyze").exists()


def test_relative_report_sweep_is_below_the_output_root(tmp_path, monkeypatch):
    """Case 6: a relative ``report.sweep`` was looked up in the working directory and the report written
    there; it is read below ``paths.output_root`` and the report stays inside the root."""
    root, elsewhere = tmp_path / "root", tmp_path / "cwd"
    elsewhere.mkdir()
    for s in (1, 2, 3):
        fake_run(root, s, local_gain=0.01)
    monkeypatch.chdir(elsewhere)
    report_on(root, "report.sweep=multirun/demo")
    assert (root / "multirun" / "demo" / "report" / "report.md").is_file()
    assert list(elsewhere.iterdir()) == []
    # a sweep outside the root (named absolutely) is read there, but the report is written inside the root
    outside = tmp_path / "outside"
    for s in (1, 2, 3):
        fake_run(outside, s, local_gain=0.01)
    report_on(root, f"report.sweep={outside / 'multirun' / 'demo'}")
    assert (root / "reports" / "demo" / "report.md").is_file() and not (outside / "multirun" / "demo" / "report").exists()


def test_a_sweep_counts_only_its_own_jobs(tmp_path):
    """Case 8: a marker (or a job record) left by an earlier sweep never fails a later, successful one, and
    the summary counts this sweep's jobs only."""
    old = tmp_path / "multirun" / "default" / "digits-resnet18-w1.0" / "seed999"
    old.mkdir(parents=True)
    (old / "analyze.failed").write_text("error: no trained run\n")                       # an earlier sweep's
    jobs = tmp_path / "multirun" / "default" / ".jobs" / "analyze"
    jobs.mkdir(parents=True)
    (jobs / "00001.json").write_text('{"folder": "x", "ok": false, "error": "error: killed sweep"}')
    res = run_entry("analyze.py", "-m", "seed=1", "analysis=linear_gaussian", "logger=none", "plots=false", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "analyze sweep finished: 1 job(s)" in res.stdout
    assert not (tmp_path / "multirun" / "default" / ".jobs").exists()


def test_refusals_leave_no_marker_and_no_folder(tmp_path):
    """Case 8: a refusal before any work (no trained run, a missing report.runs entry) is one line and leaves
    neither a marker nor the folder Hydra made for it; in a sweep the summary names each refused job."""
    res = run_entry("analyze.py", "seed=999", "logger=none", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: no trained run")
    assert not (tmp_path / "runs").exists(), sorted(tmp_path.rglob("*"))
    res = run_entry("report.py", f"report.runs=[{tmp_path / 'nope'}]", "logger=none", cwd=tmp_path)
    assert res.returncode == 2 and "does not exist" in res.stderr
    assert not (tmp_path / "reports").exists(), sorted(tmp_path.rglob("*"))
    res = run_entry("analyze.py", "-m", "seed=998,999", "logger=none", cwd=tmp_path)
    assert res.returncode == 1 and "2 analyze job(s) failed (of 2 in this sweep)" in res.stderr, res.stderr[-2000:]
    assert "seed998" in res.stderr and "seed999" in res.stderr
    sweep = tmp_path / "multirun" / "default"
    assert not list(sweep.rglob("*.failed")) and not (sweep / "digits-resnet18-w1.0").exists() and not (sweep / ".jobs").exists()


def test_environment_differences_are_one_line(tmp_path, caplog):
    """Case 5: a resume or a later stage in another environment (thread count, processor) says so in one line;
    the same environment says nothing."""
    import json
    import logging

    from axes_pipeline.environment import differs, environment, label
    from axes_pipeline.layout import RunId, RunLayout
    from axes_pipeline.training.restore import check_environment
    from axes_pipeline.training.train import record_environment

    now = environment()
    assert differs(now, now) is None and differs(None, now) is None
    other = {**now, "threads": now["threads"] + 7, "processor": "another CPU"}
    assert differs(other, now).startswith(f"threads: {now['threads'] + 7} -> {now['threads']}, processor: another CPU")
    assert f"×{now['threads']} threads" in label(now) and label(None) == "(not recorded)"

    def lines():
        said = [r.getMessage() for r in caplog.records]
        caplog.clear()
        return said

    caplog.set_level(logging.WARNING, logger="axes_pipeline")
    run = tmp_path / "run"
    env, resumed = record_environment(run, resuming=False)       # a fresh start records it
    assert env == now and resumed is None and json.loads((run / "environment.json").read_text()) == now
    assert lines() == []
    (run / "environment.json").write_text(json.dumps(other))      # started elsewhere, resumed here
    env, resumed = record_environment(run, resuming=True)
    assert env == other and resumed == now
    said = lines()
    assert len(said) == 1 and "under another environment" in said[0] and "not be bit-identical" in said[0]

    layout = RunLayout.at(RunId("default", "digits", "resnet18", 1.0, 1), tmp_path).in_folder(run)
    (run / "train_summary.json").write_text(json.dumps({"environment": other}))
    check_environment(layout)
    said = lines()
    assert len(said) == 1 and "trained in another environment" in said[0] and "threads" in said[0]
    (run / "train_summary.json").write_text(json.dumps({"environment": now}))
    check_environment(layout)
    assert lines() == []


def test_report_shows_each_seeds_environment_and_a_note_when_a_group_mixes_them(tmp_path):
    """Case 5, the report: the runs table names each seed's environment; a group that mixes them gets a notice."""
    import json

    env = {"threads": 2, "processor": "CPU A", "torch": "2.14.1", "build_digest": "abc"}
    for s in (1, 2, 3):
        run = fake_run(tmp_path, s, local_gain=0.02)
        summary = json.loads((run / "train_summary.json").read_text())
        summary["environment"] = {**env, "threads": 1} if s == 3 else env
        (run / "train_summary.json").write_text(json.dumps(summary))
    _, summary = report_on(tmp_path)
    note = [n for n in summary["notices"] if "different environments" in n]
    assert len(note) == 1 and "seeds 1, 2: CPU A ×2 threads" in note[0] and "seeds 3: CPU A ×1 threads" in note[0]
    runs = pd.read_csv(tmp_path / "multirun" / "demo" / "report" / "runs.csv")
    assert runs.set_index("seed").loc[3, "environment"].startswith("CPU A ×1 threads")


def test_a_seed_killed_mid_training_is_listed_with_the_command_that_finishes_it(tmp_path):
    """Case 10: a seed with checkpoints but no train_summary.json was missing from the report without a word."""
    for s in (1, 2, 3):
        fake_run(tmp_path, s, local_gain=0.02)
    killed = tmp_path / "multirun" / "demo" / "digits-resnet18-w0.25" / "seed4"
    (killed / "checkpoints").mkdir(parents=True)
    (killed / "checkpoints" / "last.ckpt").write_bytes(b"")
    (killed / ".hydra" / "train").mkdir(parents=True)
    (killed / ".hydra" / "train" / "overrides.yaml").write_text("- experiment=demo\n- seed=4\n")
    _, summary = report_on(tmp_path)
    entry = [s for s in summary["skipped"] if s["seed"] == 4]
    assert len(entry) == 1 and entry[0]["file"] == "train_summary.json"
    assert "training did not finish" in entry[0]["reason"] and "`python train.py experiment=demo seed=4`" in entry[0]["reason"]
    md = (tmp_path / "multirun" / "demo" / "report" / "report.md").read_text()
    assert "python train.py experiment=demo seed=4" in md


def test_a_refusal_keeps_an_earlier_commands_folder(tmp_path):
    """Case 8: the folder a refused command would remove is one Hydra made for it alone; a folder whose
    ``<stage>.log`` starts before this process (an earlier command's logs) is kept."""
    from axes_pipeline.tasks import _drop_hydra_only

    root = tmp_path / "root"
    earlier, mine = root / "reports" / "old", root / "reports" / "new"
    for folder in (earlier, mine):
        (folder / ".hydra" / "report").mkdir(parents=True)
    (earlier / "report.log").write_text("[2020-01-01 10:00:00,000][axes_pipeline][INFO] - report: ...\n")
    (mine / "report.log").write_text("")
    _drop_hydra_only(earlier, "report", root)
    _drop_hydra_only(mine, "report", root)
    assert earlier.is_dir() and not mine.exists() and root.is_dir()
