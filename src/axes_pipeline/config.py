"""Config helpers shared by every stage: resolvers, the run directory, validation of common knobs."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from axes_pipeline.errors import UserError

RUN_KINDS = ("runs", "multirun")


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


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("axes_mode"):
        OmegaConf.register_new_resolver("axes_mode", _mode)


register_resolvers()


def run_dir(cfg: DictConfig) -> Path:
    """The run directory of this config (absolute)."""
    return Path(cfg.paths.run_dir).resolve()


def run_dir_candidates(cfg: DictConfig) -> list[Path]:
    """Where a run with these overrides may live: this mode's directory first, then the other's.

    So `analyze.py seed=1` finds a run trained by `train.py -m seed=1,2` and vice versa.
    """
    own = run_dir(cfg)
    root = Path(cfg.paths.output_root).resolve()
    try:
        rel = own.relative_to(root)
    except ValueError:
        return [own]
    kind, rest = rel.parts[0], Path(*rel.parts[1:])
    others = [root / k / rest for k in RUN_KINDS if k != kind]
    return [own, *others]


def trained_run_dir(cfg: DictConfig) -> Path:
    """The directory of the trained run a later stage works on: the parent of ``ckpt=PATH``'s
    ``checkpoints/``, else the first candidate that holds a run, else this mode's own directory
    (where the stage's error then names the train command)."""
    ckpt = cfg.get("ckpt")
    if ckpt:
        p = Path(str(ckpt)).resolve()
        return p.parent.parent if p.parent.name == "checkpoints" else p.parent
    for cand in run_dir_candidates(cfg):
        if (cand / "train_summary.json").is_file() or (cand / "checkpoints").is_dir():
            return cand
    return run_dir(cfg)


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain Python containers (safe for JSON and weights_only checkpoints)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def check_positive(value, key: str) -> None:
    if value is None or value <= 0:
        raise UserError(f"{key} must be positive, got {value}")
