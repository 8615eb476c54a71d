"""Find a trained run and restore its model, for the analysis and pruning stages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from axes_pipeline.config import run_dir_candidates, trained_run_dir
from axes_pipeline.errors import UserError
from axes_pipeline.training.checkpoints import load_into, read_checkpoint
from axes_pipeline.training.train import build_datamodule, instantiate_model


@dataclass
class Trained:
    run_dir: Path        # where this stage writes (the trained run's directory)
    ckpt: Path
    model: torch.nn.Module
    datamodule: object
    meta: dict


def _train_command(cfg: DictConfig) -> str:
    parts = [f"name={cfg.name}" if cfg.name != "default" else "", f"data={cfg.data.name}",
             f"model={cfg.model.name}", f"model.width={cfg.model.width}", f"seed={cfg.seed}"]
    return "python train.py " + " ".join(p for p in parts if p)


def locate_run(cfg: DictConfig) -> tuple[Path, Path]:
    """(run_dir, checkpoint) for these overrides, or for ``ckpt=PATH``; one clear line if none."""
    if cfg.get("ckpt"):
        ckpt = Path(cfg.ckpt).resolve()
        if not ckpt.is_file():
            raise UserError(f"ckpt={cfg.ckpt} does not exist")
        return trained_run_dir(cfg), ckpt
    for cand in run_dir_candidates(cfg):
        for name in ("best.ckpt", "last.ckpt"):
            if (cand / "checkpoints" / name).is_file():
                return cand, cand / "checkpoints" / name
    raise UserError(f"no trained run at {run_dir_candidates(cfg)[0]}; train it first with "
                    f"`{_train_command(cfg)}` (or pass ckpt=PATH)")


def restore_trained(cfg: DictConfig, ckpt: Path | None = None) -> Trained:
    """Datamodule + backbone with the run's weights (eval mode, CPU); checks meta matches."""
    out, found = locate_run(cfg)
    ckpt = Path(ckpt) if ckpt is not None else found
    dm = build_datamodule(cfg)
    dm.check()
    model = instantiate_model(cfg, dm.num_classes)
    meta = load_into(model, ckpt, expect={"model": cfg.model.name, "num_classes": dm.num_classes,
                                          "width": float(cfg.model.width)})
    model.eval()
    return Trained(run_dir=out, ckpt=ckpt, model=model, datamodule=dm, meta=meta)


__all__ = ["Trained", "locate_run", "restore_trained", "read_checkpoint"]
