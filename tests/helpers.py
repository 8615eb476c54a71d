"""What tests import: the real configs composed (shrunk for CPU), entry points run as a user would.

Kept out of ``conftest.py``, which pytest owns (fixtures and process settings only).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from axes_pipeline.schema import register as register_schemas

register_schemas()  # the typed config groups, before any test composes

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")

# A tiny but real training run: digits at 16x16, ResNet-18 at width 1/8, 3 epochs, every epoch kept.
TINY = ["data.batch_size=64", "model.width=0.125", "trainer.max_epochs=3", "checkpoint.every_epoch=true",
        "callbacks.progress_bar=false", "logger=none"]


def make_cfg(config_name: str, overrides: list[str], root: Path) -> DictConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=config_name, overrides=[f"paths.output_root={root}", *overrides])


def run_entry(script: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    """Run an entry point as a user would; returns CompletedProcess (text)."""
    full_env = dict(os.environ, AXES_OUTPUT_ROOT=str(cwd), PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
