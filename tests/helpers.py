"""What tests import: the real configs composed (shrunk for CPU), entry points run as a user would.

Kept out of ``conftest.py``, which pytest owns (fixtures and process settings only).
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import pickle
import runpy
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from axes_pipeline.runs import fingerprint
from axes_pipeline.schema import register as register_schemas
from axes_pipeline.stage import StageInputs, stage_inputs

register_schemas()  # the typed config groups, before any test composes

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

# A tiny but real training run: digits at 16x16, ResNet-18 at width 1/8, 3 epochs, every epoch kept.
TINY = ["data.batch_size=64", "model.width=0.125", "trainer.max_epochs=3", "checkpoint.every_epoch=true",
        "callbacks.progress_bar=false", "logger=none"]


def make_cfg(config_name: str, overrides: list[str], root: Path) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=config_name, overrides=[f"paths.output_root={root}", *overrides])


def inputs(cfg: DictConfig) -> StageInputs:
    """What a stage body builds from ``cfg`` (:func:`axes_pipeline.stage.stage_inputs`)."""
    return stage_inputs(cfg)


def restore(cfg: DictConfig):
    """The trained run ``cfg`` names, restored as a stage restores it."""
    from axes_pipeline.training.restore import restore_trained

    return restore_trained(stage_inputs(cfg))


def prune_settings(cfg: DictConfig):
    """The validated pruning settings of a composed prune config, as ``run_prune`` builds them."""
    from axes_pipeline.pruning.resolved import PruneSettings

    return PruneSettings(OmegaConf.to_object(cfg.pruning), cfg.model.name, cfg.seed)


def protocol_dir(cfg: DictConfig) -> Path:
    """The folder of the protocol ``cfg`` prunes under (``prune/<protocol>/``)."""
    return Path(cfg.paths.run_dir) / "prune" / prune_settings(cfg).protocol.name


def run_entry(script: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    """Run an entry point as a user would, in a process of its own; returns CompletedProcess (text).

    Where it is safe, the process is a fork of this one running the script as ``__main__``: it starts
    with torch, Lightning and Hydra already imported (a fresh interpreter spends most of a refused
    command's seconds importing them). A fresh interpreter is started instead where the environment
    asks for one (``PYTHON*`` variables, read at start-up) or where torch runs several threads (an
    OpenMP pool does not survive a fork; under pytest-xdist each worker runs one thread)."""
    full_env = dict(os.environ, AXES_OUTPUT_ROOT=str(cwd), PYTHONUNBUFFERED="1", **(env or {}))
    argv = [sys.executable, str(ROOT / script), *args]
    if any(k.startswith("PYTHON") and k != "PYTHONUNBUFFERED" for k in env or {}) or not _fork_safe():
        return subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    return _run_forked(argv, cwd, full_env, timeout)


def _fork_safe() -> bool:
    import torch

    return hasattr(os, "fork") and torch.get_num_threads() == 1


def _run_forked(argv: list[str], cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:                                           # the child: never returns
            _child(argv, cwd, env, out.fileno(), err.fileno())
        deadline = time.monotonic() + timeout
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise subprocess.TimeoutExpired(argv, timeout)
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(done[1]),
                                           out.read().decode(errors="replace"), err.read().decode(errors="replace"))


def _child(argv: list[str], cwd: Path, env: dict, out: int, err: int) -> None:
    """Run ``argv[1]`` as ``python argv[1:]`` would, in this forked process, and exit with its status."""
    code = 1
    try:
        os.dup2(out, 1)
        os.dup2(err, 2)
        # pytest's capture replaced sys.stdout/err and the root logger's handlers: a fresh process has neither
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        for handler in list(logging.root.handlers):
            logging.root.removeHandler(handler)
        logging.root.setLevel(logging.WARNING)
        atexit._clear()                                        # the test process' exit handlers are not ours
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = argv[1:]
        sys.path.insert(0, str(Path(argv[1]).parent))
        try:
            runpy.run_path(argv[1], run_name="__main__")
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        atexit._run_exitfuncs()                                # wandb and the like flush here
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


# ---- shared by several test files: fake runs and reports, the small capture, fake CIFAR on disk ----

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


def report_on(root: Path, *extra):
    from axes_pipeline.report.build import run_report  # deferred: only the report tests build a page

    cfg = make_cfg("report", ["experiment=demo", "logger=none", "report.n_boot=2000", *extra], root)
    return cfg, run_report(cfg)


def add_lesions_and_propagation(run: Path, seed: int) -> None:
    """A per-run lesion summary and propagation table shaped like analyze.py's."""
    def fit(d, p_f=0.01):
        return {"n": 160, "r2_base": 0.2, "r2_full": 0.2 + d, "delta_r2": d, "delta_r2_adj": d - 0.01,
                "ci_lo": d / 2, "ci_hi": 2 * d, "ci_adj_lo": -0.01, "ci_adj_hi": 2 * d, "p_f": p_f, "n_boot": 200}
    summary = {"base_loss": 0.3, "layers": 2, "channels_lesioned": 16,
               "spearman_overall": {"input_capture": 0.1, "task_info": 0.3},
               "binned_rho_mean": {"input_capture": 0.05 + 0.01 * seed, "task_info": 0.2},
               "incremental_r2": {"base": ["input_capture", "task_info"], "extra": ["full_explained"], "scale": "rank",
                                  # the seeds' own F-test p as in the issue's demo (their mean, 0.210, is no test)
                                  "pooled": fit(0.03 + 0.005 * seed, p_f={1: 0.324, 2: 0.176, 3: 0.13}.get(seed, 0.5)),
                                  "pooled_raw": fit(0.1), "per_layer": {"conv1": fit(0.2)}},
               "recovery": {"hull_mean": 0.4, "hull_median": 0.7, "hull_n": 12, "rho_hull_full_explained": 0.35},
               "replaceability_spearman": {"expected_sign": -1, "hull_score": {"per_layer": {"conv1": 0.1},
                                           "mean": [0.003, 0.07, -0.06][seed % 3], "layers_negative": 0, "layers": 1}},
               "per_layer": {"conv1": {"lesioned": 8}}}
    (run / "analyze" / "lesion_summary.json").write_text(json.dumps(summary))
    pd.DataFrame({"upstream": ["conv1"] * 2, "downstream": ["layer1.0.conv1"] * 2, "pairing": ["local_to_local",
                  "target_to_target"], "rho": [0.3, 0.1], "null_rho": [0.0, 0.01], "n": [16, 16]}
                 ).to_csv(run / "analyze" / "propagation.csv", index=False)


QUANTITIES = ("align_input_capture_task_info", "modularity_gap", "hull_size_mean", "hull_saturated_frac", "s3_s2")


def add_dynamics_definitions_and_study(run: Path, seed: int, *, hull_cap: float | None = None) -> None:
    """dynamics.csv, definitions.csv and linear_gaussian.csv shaped like analyze.py's (six layers, epochs
    0..20; post_bn equal to pre_bn where it is by construction). ``hull_cap``: every layer's hull at it."""
    from axes_pipeline.analyses.definitions import DEFINITIONS

    rng = np.random.default_rng(seed)
    layers = [f"layer{i}.conv" for i in range(6)]

    def values(init: bool, i: int) -> dict:
        hull = hull_cap if hull_cap is not None else 3.0 + 0.1 * i + (0.0 if init else 1.0) + rng.normal(0, 0.05)
        return {"align_input_capture_task_info": (0.4 if init else 0.1) + rng.normal(0, 0.03),
                "modularity_gap": rng.normal(0.05, 0.02), "hull_size_mean": hull,
                "hull_saturated_frac": 1.0 if hull_cap is not None else (0.07 if init else 0.2) + rng.normal(0, 0.01),
                "s3_s2": (0.2 if init else 0.35) + rng.normal(0, 0.01)}

    pd.DataFrame([{"epoch": ep, "seed": seed, "layer": lay, "layer_index": i, **values(ep == 0, i)}
                  for ep in range(0, 21, 4) for i, lay in enumerate(layers)]).to_csv(run / "analyze" / "dynamics.csv",
                                                                                   index=False)
    rows = []
    for tag in ("init", "trained"):
        for i, lay in enumerate(layers):
            shared = {spatial: values(tag == "init", i) for spatial in ("sample", "gap")}
            for point, spatial in DEFINITIONS:
                v = dict(shared[spatial])
                if point != "post_bn":       # ρ differs between the points; the affine-invariant ones do not
                    v["align_input_capture_task_info"] += rng.normal(0, 0.02)
                rows.append({"point": point, "spatial": spatial, "checkpoint": tag, "layer": lay, "layer_index": i,
                             "channels": 16, **v, "seed": seed, "trained_ckpt": "best.ckpt"})
    pd.DataFrame(rows).to_csv(run / "analyze" / "definitions.csv", index=False)
    from axes_pipeline.metrics import linear_gaussian_study

    pd.DataFrame(linear_gaussian_study(steps=100, eval_every=50, seed=seed)).to_csv(
        run / "analyze" / "linear_gaussian.csv", index=False)


def full_sweep(root: Path, seeds=(1, 2, 3), *, every: bool = False, hull_cap: float | None = None) -> Path:
    """A sweep of fake runs with lesions and propagation; ``every``: dynamics, definitions and the
    linear-Gaussian study too (every section of the report)."""
    for s in seeds:
        run = fake_run(root, s, local_gain=0.05)
        add_lesions_and_propagation(run, s)
        if every:
            add_dynamics_definitions_and_study(run, s, hull_cap=hull_cap)
    return root / "multirun" / "demo" / "report"


SMALL = ["capture.n_cal=240", "capture.samples_per_image=4", "capture.batch_size=120", "graphs.null_shuffles=1"]


# --------------------------------------------------------------------------- fixtures: real formats
class _Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python-2 ``str`` (BINSTRING), as the official CIFAR pickles are: they load
    as ``b'data'`` keys with ``encoding='bytes'`` and as ``'data'`` with torchvision's ``'latin1'``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump_py2(path: Path, obj) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def _cifar_images(n: int, seed: int) -> np.ndarray:
    """[n, 3072] uint8 rows (R plane, G plane, B plane of 32×32), as in the CIFAR pickles."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar100(root: Path, n_train: int = 60, n_test: int = 20) -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        fine = [i % 100 if split == "test" else (i * 7) % 100 for i in range(n)]
        data = _cifar_images(n, seed)
        _dump_py2(
            folder / split,
            {
                b"filenames": [f"img_{i}.png".encode() for i in range(n)],
                b"batch_label": f"{split} batch".encode(),
                b"fine_labels": fine,
                b"coarse_labels": [f // 5 for f in fine],
                b"data": data,
            },
        )
        out[split] = (data, np.asarray(fine))
    _dump_py2(
        folder / "meta",
        {
            b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)],
        },
    )
    return out


def write_cifar10(root: Path, per_batch: int = 12, n_test: int = 20) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_data, train_labels = [], []
    for b in range(1, 6):
        data = _cifar_images(per_batch, 10 + b)
        labels = [(i + b) % 10 for i in range(per_batch)]
        _dump_py2(
            folder / f"data_batch_{b}",
            {
                b"batch_label": f"training batch {b} of 5".encode(),
                b"labels": labels,
                b"data": data,
                b"filenames": [f"t{b}_{i}.png".encode() for i in range(per_batch)],
            },
        )
        train_data.append(data)
        train_labels += labels
    test = _cifar_images(n_test, 99)
    test_labels = [i % 10 for i in range(n_test)]
    _dump_py2(
        folder / "test_batch",
        {b"batch_label": b"testing batch 1 of 1", b"labels": test_labels, b"data": test,
         b"filenames": [f"e{i}.png".encode() for i in range(n_test)]},
    )
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump_py2(folder / "batches.meta", {b"label_names": [n.encode() for n in names], b"num_cases_per_batch": per_batch,
                                        b"num_vis": 3072})
    return {"train": (np.concatenate(train_data), np.asarray(train_labels)), "test": (test, np.asarray(test_labels))}
