"""Fixtures and process settings shared by the tests (helpers they import live in helpers.py)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from .helpers import TINY, make_cfg

os.environ.setdefault("WANDB_MODE", "offline")
# Under pytest-xdist each worker gets a core of its own: torch's default of one thread per core in
# every worker oversubscribes the machine (about twice slower on 2 cores). Subprocesses inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
os.environ.setdefault("WANDB_SILENT", "true")


def built_once(tmp_path_factory, worker_id: str, name: str, build: Callable[[Path], None]) -> Path:
    """A private copy of a folder that ``build(folder)`` fills once per test session.

    Under pytest-xdist every worker has session fixtures of its own; the folder is built by the first
    worker that asks, under the folder the workers' temp folders share (a file lock makes the others
    wait), and each worker then works on a copy, so no test sees another worker's writes."""
    mine = tmp_path_factory.mktemp(name)
    if worker_id == "master":                        # one process: nothing to share
        build(mine)
        return mine
    shared = tmp_path_factory.getbasetemp().parent / f"shared-{name}"
    with FileLock(f"{shared}.lock"):
        if not (shared / ".built").is_file():        # the marker: a worker killed mid-build leaves none
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir()
            build(shared)
            (shared / ".built").touch()
    shutil.copytree(shared, mine, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".built"))
    return mine


def _train_tiny(root: Path) -> None:
    from axes_pipeline.tasks import run_task
    from axes_pipeline.training.train import run_training

    run_task(run_training, make_cfg("train", TINY, root))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """(output_root, overrides) of a trained tiny digits run, shared by the analysis/pruning tests
    (trained once per session; each xdist worker writes into a copy of its own)."""
    # xdist's worker_id fixture does not exist without xdist (`-p no:xdist`): its variable says the same
    worker_id = os.environ.get("PYTEST_XDIST_WORKER", "master")
    return built_once(tmp_path_factory, worker_id, "tiny", _train_tiny), list(TINY)


@pytest.fixture
def run(tiny_run, tmp_path) -> tuple[Path, list[str]]:
    """A private copy of the tiny trained run (checkpoints and summary), so tests do not share its prune/."""
    root, overrides = tiny_run
    src = Path(make_cfg("train", overrides, root).paths.run_dir)
    dst = Path(make_cfg("train", overrides, tmp_path).paths.run_dir)
    dst.mkdir(parents=True)
    shutil.copytree(src / "checkpoints", dst / "checkpoints", ignore=shutil.ignore_patterns("epoch_*"))
    shutil.copy2(src / "train_summary.json", dst / "train_summary.json")   # a finished run (partial ones are refused)
    return tmp_path, overrides


@pytest.hookimpl(tryfirst=True)     # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    """The long end-to-end runs (marked ``slow``) first, every other test grouped by its file.

    Under ``--dist loadgroup`` (``make test``) a group runs on one worker in file order, as
    ``--dist loadfile`` did (the tests of a file share its module fixtures and the worker's copy of
    the tiny run); each slow test is a unit of its own, handed out first so that the two workers
    finish together instead of one waiting on the other's last long run."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)       # stable: file order kept
    # on an xdist worker (where collection runs and the groups are read) `dist` is "no" and
    # `loadgroup` says what the controller was asked for
    if config.getoption("dist", "no") != "loadgroup" and not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        if item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))   # its file (doctests too)
