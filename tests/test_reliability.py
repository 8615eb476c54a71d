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

from .helpers import inputs, make_cfg, restore, run_entry
from .test_analyze import SMALL
from .test_data import write_cifar10
from .test_report import _report, fake_run


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
    _, summary = _report(tmp_path, "report.n_boot=200")
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
    _report(tmp_path, "report.n_boot=200")
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
    _report(tmp_path, "report.n_boot=200")
    out = tmp_path / "multirun" / "demo" / "report"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fake_run(tmp_path, 4, local_gain=0.02)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(build, "render_html", boom)      # fails after the tables and figures are written
    with pytest.raises(RuntimeError):
        _report(tmp_path, "report.n_boot=200")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".report.tmp-")]
    monkeypatch.undo()
    _, summary = _report(tmp_path, "report.n_boot=200")
    assert summary["groups"] and 4 in next(iter(summary["groups"].values()))
    assert (out / "report.md").read_bytes() != before["report.md"]


def test_report_removes_files_of_the_previous_report_it_no_longer_has(tmp_path):
    runs = [fake_run(tmp_path, s, local_gain=0.02) for s in (1, 2, 3)]
    _report(tmp_path, "report.n_boot=200")
    out = tmp_path / "multirun" / "demo" / "report"
    assert (out / "alignment_depth.png").is_file()
    (out / "notes.txt").write_text("mine")
    for r in runs:
        shutil.rmtree(r / "analyze")
    _report(tmp_path, "report.n_boot=200")
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
