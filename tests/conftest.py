"""Fixtures and process settings shared by the tests (helpers they import live in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .helpers import TINY, make_cfg

os.environ.setdefault("WANDB_MODE", "offline")
# Under pytest-xdist each worker gets a core of its own: torch's default of one thread per core in
# every worker oversubscribes the machine (about twice slower on 2 cores). Subprocesses inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """(output_root, overrides) of a trained tiny digits run, shared by the analysis/pruning tests."""
    from axes_pipeline.tasks import run_task
    from axes_pipeline.training.train import run_training

    root = tmp_path_factory.mktemp("tiny")
    cfg = make_cfg("train", TINY, root)
    run_task(run_training, cfg)
    return root, list(TINY)
