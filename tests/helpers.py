"""What tests import: the real configs composed (shrunk for CPU), entry points run as a user would.

Kept out of ``conftest.py``, which pytest owns (fixtures and process settings only).
"""

from __future__ import annotations

import atexit
import logging
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

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
