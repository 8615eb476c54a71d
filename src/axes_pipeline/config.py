"""Config helpers shared by every stage: resolvers, the run directory, validation of common knobs.
(The typed schema of each stage's root is :mod:`axes_pipeline.schema`.)"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from axes_pipeline.bounds import SEED_MAX
from axes_pipeline.errors import UserError
from axes_pipeline.runs import fingerprint

log = logging.getLogger("axes_pipeline")

RUN_KINDS = ("runs", "multirun")
# Characters a name may hold: it becomes one folder of the run directory, never a path of its own.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]*$")


def _mode() -> str:
    """'multirun' inside a Hydra sweep job, else 'runs' (also when composed outside Hydra, e.g. tests)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return "multirun"
    except Exception:  # noqa: BLE001 - hydra absent or half-initialised: a single run
        pass
    return "runs"


def check_name(value, key: str = "name") -> str:
    """``value`` if it is safe as one folder name: a path separator or ``..`` would put the run (and
    a report) outside ``paths.output_root`` and could overwrite files there."""
    text = str(value)
    if not _SAFE_NAME.match(text) or ".." in text:
        raise UserError(f"{key}={text!r} is not a plain folder name (letters, digits, _ . + = -; "
                        f"no path separators, no '..'): every output must stay below paths.output_root")
    return text


if not OmegaConf.has_resolver("axes_mode"):
    OmegaConf.register_new_resolver("axes_mode", _mode)
# ${axes_name:${name}} in the run and sweep directories: Hydra resolves it before it creates any
# folder, so an unsafe name stops before anything is written.
if not OmegaConf.has_resolver("axes_name"):
    OmegaConf.register_new_resolver("axes_name", check_name)


def run_dir(cfg: DictConfig) -> Path:
    """The run directory of this config (absolute)."""
    return Path(cfg.paths.run_dir).resolve()


def run_dir_candidates(cfg: DictConfig) -> list[Path]:
    """Where a run with these overrides may live: this mode's directory first, then the other's (so
    `analyze.py seed=1` finds a run trained by `train.py -m seed=1,2` and vice versa)."""
    own = run_dir(cfg)
    root = Path(cfg.paths.output_root).resolve()
    try:
        rel = own.relative_to(root)
    except ValueError:
        return [own]
    kind, rest = rel.parts[0], Path(*rel.parts[1:])
    return [own, *(root / k / rest for k in RUN_KINDS if k != kind)]


_ANNOUNCED: set[Path] = set()


def external_run_dir(cfg: DictConfig, ckpt: Path) -> Path:
    """Where a later stage writes for a checkpoint outside ``paths.output_root``:
    ``<output_root>/external/<data>-<model>-w<width>-seed<seed>-<digest of the checkpoint path>``,
    stable for one checkpoint path and distinct for two checkpoints of the same settings."""
    root = Path(cfg.paths.output_root).resolve()
    tag = f"{cfg.data.name}-{cfg.model.name}-w{cfg.model.width}-seed{cfg.seed}"
    return root / "external" / f"{tag}-{fingerprint({'ckpt': str(ckpt)})[:8]}"


def trained_run_dir(cfg: DictConfig) -> Path:
    """The directory of the trained run a later stage works on.

    With ``ckpt=PATH``: the run directory holding it when that lies below ``paths.output_root``,
    otherwise :func:`external_run_dir` (said once on stdout), so no stage writes outside the output
    root. Without: the first candidate that holds a run, else this mode's own directory.
    """
    ckpt = cfg.get("ckpt")
    if ckpt:
        p = Path(str(ckpt)).resolve()
        owner = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        root = Path(cfg.paths.output_root).resolve()
        if owner == root or root in owner.parents:
            return owner
        out = external_run_dir(cfg, p)
        if out not in _ANNOUNCED:
            _ANNOUNCED.add(out)
            print(f"{cfg.get('stage', 'stage')}: ckpt={ckpt} lies outside paths.output_root ({root}); "
                  f"writing to {out}")
        return out
    for cand in run_dir_candidates(cfg):
        if (cand / "train_summary.json").is_file() or (cand / "checkpoints").is_dir():
            return cand
    return run_dir(cfg)


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain Python containers (safe for JSON and weights_only checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def check_seed(value) -> int:
    """The seed as an int; a UserError for anything else (``seed=abc``) and for a seed numpy refuses
    (``seed=-1``: a numpy traceback once a ``seed-1/`` folder was made)."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value), 10)
        except ValueError:
            raise UserError(f"seed must be an integer, got {value!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise UserError(f"seed={value} is out of range: it must be in [0, {SEED_MAX}] (numpy's seed range)")
    return int(value)


def check_positive(value, key: str) -> None:
    if value is None or value <= 0:
        raise UserError(f"{key} must be positive, got {value}")


def load_plugins(modules) -> None:
    """Import the ``plugins`` modules (their decorators register scores and analyses); a module
    that cannot be imported is one UserError line naming it."""
    import importlib

    for name in modules or []:
        try:
            importlib.import_module(str(name))
        except Exception as err:  # noqa: BLE001 - any failure of a user's module is one line
            raise UserError(f"plugins: cannot import {name!r} ({type(err).__name__}: {err}); "
                            f"is it on PYTHONPATH?") from None
