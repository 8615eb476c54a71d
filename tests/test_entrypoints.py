"""The entry points as a user types them: the defaults run end to end, a command-line mistake is one
line and exit status 2, and no output ever lands outside ``paths.output_root``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from axes_pipeline.errors import UserError

from .helpers import inputs, make_cfg, run_entry

# The plain defaults (digits, ResNet-18, every score, the default capture.n_cal=2000 > digits'
# 1,258 training images) with only what keeps a CPU test short: one epoch, a narrow backbone and one
# pruning target. Measured on 2 shared cores, plain width 1.0 defaults take ~50 s (train, 1 epoch)
# + ~380 s (analyze); at width 0.125 the nine default targets take ~285 s of pruning.
SHORT = ["trainer.max_epochs=1", "model.width=0.125", "callbacks.progress_bar=false"]


def _ok(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.slow   # the four entry points on the plain defaults (every image, every score)
def test_defaults_run_end_to_end(tmp_path):
    root = f"paths.output_root={tmp_path}"
    _ok(run_entry("train.py", root, *SHORT, cwd=tmp_path))
    res = _ok(run_entry("analyze.py", root, *SHORT, cwd=tmp_path))
    assert "using all 1258 training images" in res.stdout + res.stderr      # said in one log line
    _ok(run_entry("prune.py", root, *SHORT, "pruning.targets=[0.5]", cwd=tmp_path))
    res = _ok(run_entry("report.py", root, *SHORT, cwd=tmp_path))
    run = tmp_path / "runs" / "default" / "digits-resnet18-w0.125" / "seed42"
    for f in ("train_summary.json", "analyze/axes.csv"):
        assert (run / f).is_file(), f
    assert len(list(run.glob("prune/*/prune_curves.csv"))) == 1      # one protocol's folder (targets-<hex>)
    assert (tmp_path / "runs" / "default" / "report" / "report.md").is_file(), res.stdout[-2000:]


@pytest.mark.parametrize("seed", [1, 2])
def test_default_sweep_jobs_fit_the_calibration_set(seed, tmp_path, caplog):
    # Each job of `analyze.py -m seed=1,2` composes this config: n_cal=2000 becomes the whole split.
    from dataclasses import replace

    from axes_pipeline.axes.table import fit_capture_size
    from axes_pipeline.data import build_datamodule

    knobs = inputs(make_cfg("analyze", [f"seed={seed}"], tmp_path)).knobs
    assert knobs.capture.n_cal == 2000
    dm = build_datamodule(make_cfg("analyze", [], tmp_path).data)
    with caplog.at_level(logging.INFO, logger="axes_pipeline"):
        fitted = fit_capture_size(knobs, dm)
    assert fitted.capture.n_cal == 1258 and "using all 1258 training images" in caplog.text
    assert knobs.capture.n_cal == 2000                  # new knobs: the stage's own are never changed
    small = inputs(make_cfg("analyze", ["capture.n_cal=500"], tmp_path)).knobs   # a smaller n_cal is kept
    assert fit_capture_size(small, dm) is small
    with pytest.raises(UserError, match="capture.n_cal must be at least 3, got 2"):
        fit_capture_size(replace(small, capture=replace(small.capture, n_cal=2)), dm)


@pytest.mark.parametrize("script", ["analyze.py", "prune.py", "report.py"])
@pytest.mark.parametrize("args,needle", [
    (["seed=abc"], "seed must be an integer"),
    (["model=nosuch"], "unknown model"),
    (["data=nosuch"], "unknown data"),
    (["name=../../escape"], "not a plain folder name"),
    (["trainer.nosuch=1"], "Could not override 'trainer.nosuch'"),
])
def test_command_line_mistakes_are_one_line(script, args, needle, tmp_path):
    res = run_entry(script, *args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().startswith("error: ") and needle in res.stderr
    assert res.stderr.strip().count("\n") == 0, res.stderr
    assert not list(tmp_path.iterdir())                # refused before Hydra made any folder


def test_unknown_choice_lists_the_options(tmp_path):
    res = run_entry("analyze.py", "analysis=[axes,nosuch]", cwd=tmp_path)
    assert res.returncode == 2 and "choose one of: all, axes, definitions, dynamics" in res.stderr, res.stderr


def test_ckpt_outside_the_output_root_goes_to_external(tiny_run, tmp_path, capsys):
    root, overrides = tiny_run
    ckpt = Path(make_cfg("train", overrides, root).paths.run_dir) / "checkpoints" / "best.ckpt"
    from axes_pipeline.tasks import trained_dir
    from axes_pipeline.training.restore import locate_run

    # inside the output root: the run directory that holds the checkpoint
    assert trained_dir(make_cfg("analyze", [*overrides, f"ckpt={ckpt}"], root)) == ckpt.parent.parent
    # outside: <output_root>/external/<data>-<model>-w<width>-seed<seed>-<digest>, said on stdout
    other = tmp_path / "elsewhere"
    cfg = make_cfg("analyze", [*overrides, f"ckpt={ckpt}"], other)
    out = trained_dir(cfg)
    assert out.parent == other.resolve() / "external"
    assert out.name.startswith("digits-resnet18-w0.125-seed42-")
    run, found = locate_run(inputs(cfg).run, inputs(cfg).ckpt)
    assert (run.dir, found) == (out, ckpt.resolve())
    assert str(out) in capsys.readouterr().out
    assert trained_dir(cfg) == out                 # stable: a rerun finds its own results


def test_run_task_refuses_a_bad_seed_or_name(tmp_path):
    from axes_pipeline.config import check_seed
    from axes_pipeline.tasks import run_task

    assert check_seed("7") == 7 and check_seed(3) == 3
    with pytest.raises(UserError, match="seed must be an integer"):
        check_seed("abc")
    cfg = make_cfg("train", ["logger=none"], tmp_path)
    cfg.name = "../escape"            # seed is typed: a bad one fails at composition (test_schema)
    with pytest.raises(SystemExit) as exit_:
        run_task(lambda c: None, cfg, where=lambda c: tmp_path)
    assert exit_.value.code == 2
