"""prune.py end to end on the tiny trained digits run: outputs, resume, fine-tune + export, bad inputs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from axes_pipeline.errors import UserError
from axes_pipeline.models import conv_layers
from axes_pipeline.pruning import inputs as prune_inputs
from axes_pipeline.pruning import summary as prune_summary
from axes_pipeline.pruning import sweep as prune_sweep
from axes_pipeline.pruning.run import run_prune
from axes_pipeline.runs import read_json

from .helpers import make_cfg, protocol_dir, prune_settings, restore, run_entry

FAST = ["pruning.latency=false"]
AXES_COLUMNS = ["input_capture", "peer_overlap", "full_explained", "hull_size", "hull_explained", "hull_saturated",
                "hull_score", "task_info", "target_excess", "task_redundancy", "task_unique", "l1", "l2", "bn_scale"]


def _cfg(run, *extra):
    root, overrides = run
    return make_cfg("prune", [*overrides, *FAST, *extra], root)


_prune_dir = protocol_dir


@pytest.fixture
def no_axes_module(monkeypatch):
    """The axes step hands back the table the test wrote (``_write_fake_axes``) instead of capturing:
    the scores then read made-up axes, without the seconds of a real capture."""
    def fake(knobs, trained, own, *a, **k):
        folder = Path(trained.run_dir) / "analyze"
        return pd.read_csv(folder / "axes.csv"), folder, {}

    monkeypatch.setattr(prune_inputs, "stage_axes", fake)


def _write_fake_axes(cfg) -> Path:

    trained = restore(cfg)
    rng = np.random.default_rng(0)
    rows = [{"layer": layer, "channel": c, **{k: float(rng.random()) for k in AXES_COLUMNS}}
            for layer, conv in conv_layers(trained.model).items() for c in range(conv.out_channels)]
    path = Path(trained.run_dir) / "analyze" / "axes.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_prune_end_to_end(run, no_axes_module):
    cfg = _cfg(run, "pruning.scores=[input_capture,ixy_minus_red_b0.3,task_info,l1,bn_scale,taylor,random]",
               "pruning.targets=[0.95,0.9,0.85,0.8,0.7]", "pruning.random_draws=3", "pruning.calibration.n=256")
    _write_fake_axes(cfg)
    summary = run_prune(cfg)
    out = _prune_dir(cfg)
    curves = pd.read_csv(out / "prune_curves.csv")
    assert len(curves) == (6 + 3) * 5
    for col in ("score", "axis", "draw", "target_flops", "achieved_flops", "params_frac", "acc_before_ft", "top5",
                "latency_ms"):
        assert col in curves.columns
    axis = dict(zip(curves["score"], curves["axis"]))
    assert axis["input_capture"] == "local" and axis["task_info"] == "target" and axis["random"] == "baseline"
    assert sorted(curves.loc[curves["score"] == "random", "draw"].unique()) == [0, 1, 2]
    assert (curves["achieved_flops"] - curves["target_flops"]).abs().max() <= 0.005
    assert (curves["macs"] == curves["macs_analytic"]).all()           # fvcore on the pruned nets
    assert curves["params_frac"].between(0, 1).all()
    assert curves["acc_before_ft"].between(0, 1).all()
    assert curves["val_acc_before_ft"].between(0, 1).all()             # every point also on validation
    # fine-tune budget 0 by default: nothing recovered, so after = before (METHODS §9)
    assert (curves["finetune_epochs"] == 0).all() and curves["acc_after_ft"].equals(curves["acc_before_ft"])

    s = read_json(out / "prune_summary.json")
    assert s["unpruned"]["macs"] > 0 and 0 < s["unpruned"]["acc"] <= 1
    assert set(s["scores"]) == {"input_capture", "ixy_minus_red_b0.3", "task_info", "l1", "bn_scale", "taylor", "random"}
    for v in s["scores"].values():
        assert np.isfinite(v["flops_auc"]) and v["flops_auc_rel"] == pytest.approx(v["flops_auc"] / s["unpruned"]["acc"])
    assert s["best_local"]["score"] in ("input_capture", "ixy_minus_red_b0.3")
    assert s["best_target"]["score"] == "task_info"
    # the best is chosen on validation, its test AUC reported; one grid for every score
    assert s["selection"]["chosen_on"] == "val" and s["selection"]["measured_on"] == "test"
    assert s["selection"]["n_val"] > 0 and 0 < s["unpruned_val_acc"] <= 1
    bl = s["best_local"]
    assert bl["chosen_on"] == "val" and bl["flops_auc"] == s["scores"][bl["score"]]["flops_auc"]
    assert bl["val_flops_auc"] == max(s["scores"][n]["val_flops_auc"] for n in ("input_capture", "ixy_minus_red_b0.3"))
    assert s["flops_auc_grid"]["removed_flops"] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.3])
    assert s["flops_auc_grid"]["off_target_points"] == 0
    assert s["sweeps"]["ixy_minus_red_b"]["best"]["chosen_on"] == "val"
    text = (out / "prune_summary.json").read_text()
    import hashlib

    assert "NaN" not in text and s["curves_sha256"] == hashlib.sha256((out / "prune_curves.csv").read_bytes()).hexdigest()
    assert set(s["axis_means"]) == {"local", "target", "mixed", "baseline"}
    assert [p["param"] for p in s["sweeps"]["ixy_minus_red_b"]["points"]] == [0.0, 0.3]
    assert s["config"]["pruning"]["tolerance"] == 0.005 and s["allocation"] == "global"
    assert summary["matching"]["unmatched"] == 0
    for png in ("prune_curves.png", "prune_sweep_beta.png"):
        assert (out / png).stat().st_size > 1000

    # A random ranking is below a magnitude ranking on a trained network (FLOPs-AUC, mean over
    # draws). |γ| (bn_scale) and Taylor beat random on every small digits net we tried (7 of 7);
    # the filter L1 norm did not reliably (about half the nets, global or uniform allocation), so
    # it is not asserted here: on these BatchNorm nets a filter's norm says little.
    rnd = s["scores"]["random"]
    assert len(rnd["flops_auc_draws"]) == 3
    assert rnd["flops_auc"] < s["scores"]["bn_scale"]["flops_auc"]
    assert rnd["flops_auc"] < s["scores"]["taylor"]["flops_auc"]


def test_resume_after_interrupt_skips_finished_points(run, monkeypatch):
    cfg = _cfg(run, "pruning.scores=[l2,random]", "pruning.random_draws=2", "pruning.targets=[0.8,0.6]",
               "pruning.fvcore_check=false")
    real = prune_sweep.one_point
    calls = []

    def interrupted(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args[2:4])  # (draw, target)
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_sweep, "one_point", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_prune(cfg)
    points = sorted((_prune_dir(cfg) / "points").glob("*.json"))
    assert len(points) == 3 and not (_prune_dir(cfg) / "prune_curves.csv").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in points}

    calls.clear()
    monkeypatch.setattr(prune_sweep, "one_point", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    summary = run_prune(cfg)
    assert len(calls) == 3 and summary["points_computed_this_run"] == 3   # 6 points, 3 were done
    for p in points:
        assert p.stat().st_mtime_ns == stamps[p.name]
    assert len(pd.read_csv(_prune_dir(cfg) / "prune_curves.csv")) == 6

    calls.clear()
    run_prune(cfg)                                                         # nothing left to do
    assert calls == []
    cfg2 = _cfg(run, "pruning.scores=[l2,random]", "pruning.random_draws=2", "pruning.targets=[0.8,0.6]",
                "pruning.fvcore_check=false", "pruning.allocation=uniform")
    run_prune(cfg2)                                                        # other settings: recomputed
    assert len(calls) == 6


def test_finetune_export_and_latency(run):
    from axes_pipeline.pruning.evaluate import evaluate
    from axes_pipeline.pruning.export import load_pruned

    cfg = _cfg(run, "pruning.scores=[l1]", "pruning.targets=[0.5]", "pruning.finetune.enabled=true",
               "pruning.finetune.epochs=1", "pruning.finetune.max_batches=3", "pruning.export=true",
               "pruning.latency=true", "pruning.latency_batch_sizes=[1,8]", "pruning.latency_repeats=2")
    run_prune(cfg)
    row = pd.read_csv(_prune_dir(cfg) / "prune_curves.csv").iloc[0]
    assert 0 <= row["acc_after_ft"] <= 1 and row["finetune_steps"] == 3
    assert row["latency_ms"] > 0 and row["latency_cpu_b8_ms"] > 0 and row["speedup_cpu_b1"] > 0
    path = _prune_dir(cfg) / "models" / "l1_0.5.pt"
    torch.load(path, weights_only=True)
    model = load_pruned(path)
    dm = restore(cfg).datamodule
    acc = evaluate(model, dm.test_dataloader(), torch.device("cpu"))
    assert acc["acc"] == pytest.approx(row["acc_after_ft"])               # the exported net is the evaluated one
    assert read_json(_prune_dir(cfg) / "prune_summary.json")["unpruned"]["latency_cpu_b1_ms"] > 0


def test_a_points_finetune_repeats_whatever_ran_before_it(run):
    import shutil

    cfg = _cfg(run, "pruning.scores=[l1]", "pruning.targets=[0.5]", "pruning.finetune.enabled=true",
               "pruning.finetune.epochs=1", "pruning.finetune.max_batches=3")
    rows = []
    for draws in (0, 1000):
        torch.rand(draws)                     # another history of the global RNG (a resume, other points)
        shutil.rmtree(_prune_dir(cfg), ignore_errors=True)
        run_prune(cfg)
        rows.append(pd.read_csv(_prune_dir(cfg) / "prune_curves.csv").iloc[0])
    assert rows[0]["finetune_loss"] == rows[1]["finetune_loss"]
    assert rows[0]["acc_after_ft"] == rows[1]["acc_after_ft"]


def test_channel_fraction_mode(run):
    cfg = _cfg(run, "pruning.scores=[l1]", "pruning.targets=[0.9,0.7]", "pruning.mode=channel_fraction",
               "pruning.allocation=uniform", "pruning.fvcore_check=false")
    run_prune(cfg)
    df = pd.read_csv(_prune_dir(cfg) / "prune_curves.csv")
    assert df["target_flops"].isna().all() and sorted(df["target_channels"]) == [0.7, 0.9]
    assert (df["channels_frac"] - df["target_channels"]).abs().max() < 0.08
    assert (df["achieved_flops"] < 1).all()


# ------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("override,match", [
    ("pruning.targets=[0.5,1.5]", "outside \\(0, 1\\]"),
    ("pruning.targets=[0]", "outside \\(0, 1\\]"),
    ("pruning.scores=[l1,magnitude]", "magnitude_plus_ix_a<α>"),
    ("pruning.mode=foo", "pruning.mode"),
    ("pruning.allocation=layerwise", "allocation"),
    ("pruning.tolerance=0", "tolerance"),
])
def test_bad_settings_fail_in_one_line(tmp_path, override, match):
    from axes_pipeline.bounds import check_bounds

    cfg = make_cfg("prune", ["logger=none", override], tmp_path)
    with pytest.raises(UserError, match=match) as err:
        check_bounds(cfg)            # the schema's ranges, before the stage (run_task)
        prune_settings(cfg)          # what a type cannot say
    assert "\n" not in str(err.value)


def test_bad_target_from_the_command_line(tmp_path):
    res = run_entry("prune.py", "pruning.targets=[1.2]", "logger=none", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "outside (0, 1]" in lines[0]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("override", ["pruning.nosuch=1", "pruning.tolerance=abc", "pruning.targets=[abc]",
                                      "pruning.finetune.epochs=x", "pruning.calibration.nosuch=1",
                                      "pruning.device=cuda"])   # one device knob: the top-level `device`
def test_schema_refuses_wrong_types_and_unknown_keys_at_composition(tmp_path, override):
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with pytest.raises((HydraException, OmegaConfBaseException)):
        make_cfg("prune", ["logger=none", override], tmp_path)


def test_unknown_pruning_key_from_the_command_line(tmp_path):
    res = run_entry("prune.py", "pruning.nosuch=1", "logger=none", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "pruning.nosuch" in lines[0]
    assert "Traceback" not in res.stderr


def test_schema_defaults_are_the_registry(tmp_path):
    from dataclasses import fields

    from axes_pipeline.pruning.scores import DEFAULT_SCORES, SCORES, register, score_names
    from axes_pipeline.pruning.settings import Finetune, PruningConfig

    assert PruningConfig().scores is None   # null: every registered score when the run starts, in order
    cfg = make_cfg("prune", ["logger=none"], tmp_path)
    settings = prune_settings(cfg)
    assert [s.name for s in settings.scores] == list(DEFAULT_SCORES) and settings.tolerance == 0.005
    # the settings keep the schema's field names (plus the run's seed, the progress display and the protocol;
    # the fine-tune's between_steps, a field of pruning.finetune, is the schedule's)
    names = {f.name for f in fields(PruningConfig)} | {f.name for f in fields(Finetune)}
    assert set(vars(settings)) - names == {"seed", "progress", "protocol"}
    assert settings.max_fraction == cfg.pruning.max_fraction["global"] and settings.finetune is None

    @register("plugin_probe", "target")   # what a plugins=[my_pkg.scores] module does
    def _probe(ctx, draw):
        """A plugin's score."""
        return {}

    try:
        names = [s.name for s in prune_settings(cfg).scores]
        assert "plugin_probe" in names and names == score_names()   # it joins the default sweep, with its axis
        assert names.index("plugin_probe") < names.index("magnitude_plus_ix_a0.25")
        assert "plugin_probe" not in [s.name for s in prune_settings(make_cfg("prune", ["pruning.scores=[l1]"], tmp_path)).scores]
    finally:
        del SCORES["plugin_probe"]


def test_cuda_device_without_a_gpu_is_one_line():
    from axes_pipeline.devices import resolve_device

    assert resolve_device("cpu").type == "cpu" and resolve_device("auto").type in ("cpu", "cuda")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(UserError, match="device=cuda but no CUDA GPU is visible"):
        resolve_device("cuda")


def test_auto_allocation_per_backbone(tmp_path):
    for model, want in (("resnet18", "global"), ("vgg16", "global"), ("mobilenetv2", "uniform"),
                        ("convnext_t", "uniform")):
        assert prune_settings(make_cfg("prune", [f"model={model}"], tmp_path)).allocation == want


def test_a_failing_axes_step_is_not_replaced_by_a_stale_table(run, monkeypatch):
    # issue 21: a bug in the axes step once fell back to reading axes.csv without its fingerprint
    cfg = _cfg(run, "pruning.scores=[hull_score]", "pruning.targets=[0.5]")
    _write_fake_axes(cfg)   # a table of unknown settings (no fingerprint)

    def broken(knobs, trained, own, *a, **k):
        raise KeyError("capture")

    monkeypatch.setattr(prune_inputs, "stage_axes", broken)
    with pytest.raises(KeyError, match="capture"):
        run_prune(cfg)
    assert not (_prune_dir(cfg) / "points").exists()


def test_axes_scores_compute_the_analysis_on_demand(run):
    cfg = _cfg(run, "pruning.scores=[input_capture]", "pruning.targets=[0.7]", "capture.n_cal=200",
               "capture.samples_per_image=4", "gradients.enabled=false", "graphs.null_shuffles=0")
    summary = run_prune(cfg)
    # computed and cached in prune's own place: analyze's folder is analyze.py's (tables, plots, summary together)
    own = Path(cfg.paths.run_dir) / "prune" / "axes"    # beside the protocol folders: shared by them
    assert (own / "axes.csv").is_file() and summary["axes_from"] == str(own)
    assert not (Path(cfg.paths.run_dir) / "analyze" / "axes.csv").exists()
    assert summary["scores"]["input_capture"]["points"] == 1


# ------------------------------------------------------------------------------ sound outputs


def test_one_target_writes_points_but_no_auc(run, capsys):
    cfg = _cfg(run, "pruning.scores=[l2]", "pruning.targets=[0.6]", "pruning.fvcore_check=false")
    s = run_prune(cfg)
    out = capsys.readouterr().out
    assert "a FLOPs-AUC needs at least two targets" in out
    assert len(pd.read_csv(_prune_dir(cfg) / "prune_curves.csv")) == 1
    assert s["scores"]["l2"]["flops_auc"] is None and "at least two targets" in s["scores"]["l2"]["no_auc"]
    assert "NaN" not in (_prune_dir(cfg) / "prune_summary.json").read_text()


def test_nan_in_axes_csv_stops_prune_naming_the_rebuild(run, no_axes_module):
    cfg = _cfg(run, "pruning.scores=[hull_score,l2]", "pruning.targets=[0.8,0.6]")
    path = _write_fake_axes(cfg)
    df = pd.read_csv(path)
    df.loc[5, "hull_score"] = np.nan
    df.to_csv(path, index=False)
    with pytest.raises(UserError) as err:
        run_prune(cfg)
    msg = str(err.value)
    assert str(path) in msg and "hull_score holds 1 NaN" in msg and "analysis.axes.recompute=true" in msg
    assert "\n" not in msg and not (_prune_dir(cfg) / "points").exists()


def test_nan_from_the_analysis_stage_is_caught_too(run, monkeypatch):
    cfg = _cfg(run, "pruning.scores=[input_capture]", "pruning.targets=[0.8,0.6]")
    table = pd.read_csv(_write_fake_axes(cfg))
    table.loc[0, "input_capture"] = np.nan
    monkeypatch.setattr(prune_inputs, "stage_axes", lambda c, trained, own, *a, **k: (table, Path(own), {}))
    with pytest.raises(UserError, match="input_capture holds 1 NaN"):
        run_prune(cfg)


def test_damaged_point_is_recomputed_with_a_note(run, monkeypatch, capsys):
    cfg = _cfg(run, "pruning.scores=[l2]", "pruning.targets=[0.8,0.6]", "pruning.fvcore_check=false")
    run_prune(cfg)
    point = _prune_dir(cfg) / "points" / "l2__0.8.json"
    rec = read_json(point)
    rec["acc_before_ft"] = float("nan")
    point.write_text(__import__("json").dumps(rec))
    calls = []
    real = prune_sweep.one_point
    monkeypatch.setattr(prune_sweep, "one_point", lambda *a, **k: (calls.append(a[3]), real(*a, **k))[1])
    capsys.readouterr()
    run_prune(cfg)
    assert calls == [0.8]
    assert "point l2__0.8.json is damaged (acc_before_ft is nan); recomputing it" in capsys.readouterr().out
    assert pd.read_csv(_prune_dir(cfg) / "prune_curves.csv")["acc_before_ft"].notna().all()


def test_points_are_keyed_by_checkpoint_content_not_its_time(run, monkeypatch):
    import os


    cfg = _cfg(run, "pruning.scores=[l2]", "pruning.targets=[0.8,0.6]", "pruning.fvcore_check=false")
    run_prune(cfg)
    ckpt = Path(restore(cfg).ckpt)
    os.utime(ckpt, (1e9, 1e9))                  # the same weights, touched
    calls = []
    monkeypatch.setattr(prune_sweep, "one_point", lambda *a, **k: calls.append(1))
    run_prune(cfg)
    assert calls == []
    key = read_json(_prune_dir(cfg) / "points" / "l2__0.8.json")["fingerprint"]
    assert len(key["ckpt_digest"]) == 16 and "data.name" in key


def test_curves_and_summary_change_together(run, monkeypatch):
    cfg = _cfg(run, "pruning.scores=[l2]", "pruning.targets=[0.8,0.6]", "pruning.fvcore_check=false")
    run_prune(cfg)
    out = _prune_dir(cfg)
    before = {n: (out / n).read_bytes() for n in ("prune_curves.csv", "prune_summary.json")}
    real = Path.write_text

    def failing(self, *a, **k):
        if self.name.startswith(".prune_summary.tmp-"):
            raise OSError("disk full")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", failing)
    with pytest.raises(OSError):
        prune_summary.write_stage(out, pd.read_csv(out / "prune_curves.csv").iloc[:1], {"scores": {}})
    assert {n: (out / n).read_bytes() for n in before} == before     # both old, none half-new
    assert not list(out.glob(".prune_*tmp-*"))


PLUGIN = '''
import numpy as np

from axes_pipeline.analyses.registry import analysis
from axes_pipeline.pruning.scores import register


@register("filter_mean_abs", "baseline")
def filter_mean_abs(ctx, draw):
    """Mean |w| of the filter (a user's score)."""
    return {layer: conv.weight.detach().abs().mean(dim=(1, 2, 3)).numpy() for layer, conv in ctx.layers.items()}


@analysis("layer_count")
def layer_count(ctx, block):
    return {"layers": len(ctx.units)}
'''


def test_a_plugin_adds_a_score_and_an_analysis(run, tmp_path, monkeypatch):
    # README "Extending": one file (a module on PYTHONPATH) plus one config entry (plugins=[...])
    from axes_pipeline.analyses.analyze import run_analysis
    from axes_pipeline.analyses.registry import ANALYSES
    from axes_pipeline.pruning import run_prune
    from axes_pipeline.pruning.scores import SCORES
    from axes_pipeline.tasks import run_task

    # the registries are process-wide: leave them as found for the tests that list them
    monkeypatch.setitem(SCORES, "filter_mean_abs", None)
    monkeypatch.setitem(ANALYSES, "layer_count", None)
    monkeypatch.delitem(sys.modules, "plugin_mod", raising=False)
    (tmp_path / "plugin_mod").mkdir()
    (tmp_path / "plugin_mod" / "__init__.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _cfg(run, "plugins=[plugin_mod]", "pruning.scores=[filter_mean_abs,l1]", "pruning.targets=[0.7]",
               "pruning.fvcore_check=false", "pruning.eval_samples=128")
    summary = run_task(run_prune, cfg)
    assert summary is not None
    curves = pd.read_csv(_prune_dir(cfg) / "prune_curves.csv")
    assert set(curves["score"]) == {"filter_mean_abs", "l1"}
    root, overrides = run
    acfg = make_cfg("analyze", [*overrides, "plugins=[plugin_mod]", "+analysis.layer_count={}", "plots=false"], root)
    result = run_task(run_analysis, acfg)
    assert result["layer_count"]["layers"] > 0
    bad = _cfg(run, "plugins=[no_such_plugin_module]")
    from axes_pipeline.config import load_plugins

    with pytest.raises(UserError, match="plugins: cannot import 'no_such_plugin_module'"):
        load_plugins(bad.plugins)


def test_unmatched_target_warns_with_the_count_it_was_judged_on(run, monkeypatch, caplog):
    # fvcore counting 4% more than the analytic cost model: the search hits the target on its own count,
    # the point is judged (matched=False) on fvcore's, and the warning must quote that same number
    real = prune_sweep.fvcore_macs
    def inflated(m, x, by_module=False):
        fv, u, per = real(m, x, by_module=True)
        return (int(fv * 1.04), u, per) if by_module else (int(fv * 1.04), u)

    monkeypatch.setattr(prune_sweep, "fvcore_macs", inflated)
    monkeypatch.setattr(prune_sweep, "_BY_ARCHITECTURE", {})   # counted once per architecture: not from the cache
    cfg = _cfg(run, "pruning.scores=[l2]", "pruning.targets=[0.5]")
    with caplog.at_level(logging.WARNING, logger="axes_pipeline"):
        run_prune(cfg)
    row = pd.read_csv(_prune_dir(cfg) / "prune_curves.csv").iloc[0]
    assert not row["matched"] and abs(row["achieved_flops_analytic"] - 0.5) <= 0.005
    (line,) = [r.getMessage() for r in caplog.records if "not matched" in r.getMessage()]
    assert f"achieved {row['achieved_flops']:.4f}, fvcore count" in line
