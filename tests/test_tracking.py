"""wandb, offline by default: every stage writes its own run beside its outputs, grouped by experiment,
with no account, no network and no prompt; a report logs its tables."""

from __future__ import annotations

import pytest

from .helpers import TINY, inputs, make_cfg


def _offline_runs(where):
    return sorted(p for p in where.glob("wandb/offline-run-*") if any(p.glob("*.wandb")))


@pytest.fixture(scope="module")
def wandb_root(tmp_path_factory):
    from axes_pipeline.tasks import run_task
    from axes_pipeline.training.train import run_training

    root = tmp_path_factory.mktemp("wb")
    overrides = [o for o in TINY if not o.startswith("logger=")] + ["logger=wandb", "trainer.max_epochs=1",
                                                                    "name=tracked"]
    run_task(run_training, make_cfg("train", overrides, root))
    return root, overrides


def test_train_and_analyze_write_offline_runs(wandb_root):
    from axes_pipeline.analyses.analyze import run_analysis

    root, overrides = wandb_root
    cfg = make_cfg("analyze", [*overrides, "capture.n_cal=200", "capture.samples_per_image=4",
                               "graphs.null_shuffles=1", "gradients.enabled=false", "plots=false"], root)
    assert cfg.logger.mode == "offline" and cfg.logger.group is None     # null: the experiment's name
    run_analysis(cfg)
    run = inputs(cfg).run.dir
    assert len(_offline_runs(run)) == 1                 # training's run
    assert len(_offline_runs(run / "analyze")) == 1     # the analysis' run, beside its tables


def test_tracker_names_and_groups(wandb_root):
    from axes_pipeline.tracking import WandbTracking

    root, overrides = wandb_root
    tracked = inputs(make_cfg("analyze", overrides, root)).tracked
    assert isinstance(tracked.backend, WandbTracking)
    kw = tracked.backend.init_kwargs(tracked, "analyze", root)
    assert kw["group"] == "tracked" and kw["job_type"] == "analyze" and kw["mode"] == "offline"
    # the run's slug, width included: the run folder's name (digits-resnet18-w0.125/seed42)
    assert kw["name"] == "digits-resnet18-w0.125-seed42-analyze" == f"{tracked.id.slug('-')}-analyze"
    report = inputs(make_cfg("report", overrides, root)).tracked
    assert report.backend.init_kwargs(report, "report", root)["name"] == "tracked-report"


def test_online_without_credentials_is_one_line(tmp_path, monkeypatch):
    from axes_pipeline.errors import UserError
    from axes_pipeline.tracking import tracking

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    cfg = make_cfg("train", ["logger=wandb", "logger.mode=online"], tmp_path)
    with pytest.raises(UserError, match="WANDB_API_KEY"):
        tracking(cfg.logger)


@pytest.mark.parametrize("overrides", [["logger.nosuch=1"], ["logger.tags=3"], ["logger=csv", "logger.mode=online"]])
def test_logger_schema_refuses_wrong_types_and_unknown_keys(overrides, tmp_path):
    from hydra.errors import HydraException

    with pytest.raises(HydraException):
        make_cfg("train", overrides, tmp_path)


def test_logger_option_is_a_tracking_backend(tmp_path):
    from axes_pipeline.tracking import CSVTracking, WandbTracking, tracking

    assert tracking(make_cfg("train", ["logger=none"], tmp_path).logger) is None
    assert isinstance(tracking(make_cfg("train", ["logger=csv"], tmp_path).logger), CSVTracking)
    wandb = tracking(make_cfg("train", ["name=x"], tmp_path).logger)        # the default: wandb, offline
    assert isinstance(wandb, WandbTracking)
    # group and run name null: the experiment's name and the run's slug (RunId), at init
    assert (wandb.mode, wandb.project, wandb.group, wandb.run_name) == ("offline", "axes-pipeline", None, None)


SPY = '''
import os, socket
_log = os.environ["AXES_NET_LOG"]


def _record(what):
    with open(_log, "a") as f:
        f.write(what + "\\n")


_getaddrinfo = socket.getaddrinfo


def getaddrinfo(host, *a, **k):
    _record(f"getaddrinfo {host}")
    raise OSError("network use in an offline run")


_connect = socket.socket.connect


def connect(self, address):
    if self.family != socket.AF_UNIX:
        _record(f"connect {address}")
        raise OSError("network use in an offline run")
    return _connect(self, address)


socket.getaddrinfo = getaddrinfo
socket.socket.connect = connect
'''


def test_offline_run_makes_no_network_request(tmp_path, monkeypatch):
    """wandb offline with no key: not one DNS query or connection, from our process (a socket spy
    loaded by sitecustomize) nor from wandb's service process (strace over every child, when the
    machine has strace)."""
    import os
    import shutil

    from .helpers import ROOT, run_entry

    spy_dir = tmp_path / "spy"
    spy_dir.mkdir()
    (spy_dir / "sitecustomize.py").write_text(SPY)
    net_log = tmp_path / "net.log"
    env = {"PYTHONPATH": os.pathsep.join([str(spy_dir), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "AXES_NET_LOG": str(net_log), "NETRC": str(tmp_path / "no-netrc")}
    # logger.mode=offline from the config alone: the suite's WANDB_MODE=offline would hide the query
    # (wandb's process-wide telemetry reads the environment, not the run's settings).
    hidden = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_ERROR_REPORTING")
    args = ["logger=wandb", "model.width=0.125", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
            "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "callbacks.progress_bar=false"]
    strace = shutil.which("strace")
    trace = tmp_path / "trace.txt"
    if strace:
        import subprocess
        import sys

        full_env = {k: v for k, v in dict(os.environ, AXES_OUTPUT_ROOT=str(tmp_path), **env).items()
                    if k not in hidden}
        res = subprocess.run([strace, "-f", "-e", "trace=connect,sendto,sendmmsg", "-o", str(trace),
                              sys.executable, str(ROOT / "train.py"), *args],
                             cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=600)
    else:
        for key in hidden:
            monkeypatch.delenv(key, raising=False)
        res = run_entry("train.py", *args, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert list(tmp_path.rglob("offline-run-*")), "no offline wandb run was written"
    assert not net_log.exists(), net_log.read_text()
    if strace:
        inet = [line for line in trace.read_text().splitlines() if "AF_INET" in line or "htons(53)" in line]
        assert not inet, inet[:5]


def test_resumed_training_continues_its_wandb_run(tmp_path, monkeypatch):
    from axes_pipeline.tasks import run_task
    from axes_pipeline.training.train import Throughput, run_training

    over = [o for o in TINY if not o.startswith(("logger=", "trainer.max_epochs", "checkpoint."))] + [
        "logger=wandb", "trainer.max_epochs=2", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1"]
    cfg = make_cfg("train", over, tmp_path)

    def crash(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")

    with monkeypatch.context() as m:
        m.setattr(Throughput, "on_train_batch_start", crash)
        with pytest.raises(RuntimeError):
            run_task(run_training, cfg)
    run_task(run_training, make_cfg("train", over, tmp_path))
    from pathlib import Path

    run = Path(cfg.paths.run_dir)
    run_id = (run / "wandb" / "train_run_id").read_text().strip()
    runs = _offline_runs(run)
    # offline-run-<time>-<id>, with wandb's "-1" suffix when both started within the same second
    import re

    assert len(runs) == 2 and all(re.search(rf"-{run_id}(-\d+)?$", p.name) for p in runs), runs





def test_training_log_holds_one_line_per_epoch_and_no_bar(tmp_path):
    """stdout redirected to a file (with the default callbacks.progress_bar node): Lightning's bar is
    off, a line per epoch is there instead of ~120 bar redraws per seed."""
    import os
    import subprocess
    import sys

    from .helpers import ROOT

    log_file = tmp_path / "train.log"
    args = ["logger=none", "model.width=0.125", "trainer.max_epochs=2", "+trainer.limit_train_batches=3",
            "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1"]
    env = dict(os.environ, AXES_OUTPUT_ROOT=str(tmp_path), PYTHONUNBUFFERED="1")
    with open(log_file, "w") as f:
        res = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                             stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = log_file.read_text()
    assert res.returncode == 0, text[-3000:]
    epochs = [line for line in text.splitlines() if line.startswith("train: epoch ")]
    assert [line.split()[2] for line in epochs] == ["1/2", "2/2"], text[-2000:]
    assert all("val/acc=" in line and "train/loss=" in line for line in epochs)
    assert "\r" not in text and "it/s]" not in text and "Epoch 0:" not in text
