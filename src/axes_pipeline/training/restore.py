"""Find a trained run and restore its model, for the analysis and pruning stages."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from axes_pipeline.config import run_dir_candidates, trained_run_dir
from axes_pipeline.errors import UserError
from axes_pipeline.runs import DATA_KEYS_NOT_IDENTITY, data_identity, read_json, settings_diff
from axes_pipeline.training.checkpoints import load_into
from axes_pipeline.training.train import build_datamodule, instantiate_model

log = logging.getLogger("axes_pipeline")


@dataclass
class Trained:
    run_dir: Path        # where this stage writes (the trained run's directory)
    ckpt: Path
    model: torch.nn.Module
    datamodule: object
    meta: dict
    #: "" for the run's default checkpoint, "@<stem>" for another one (:func:`results_tag`)
    tag: str = ""

    def stage_dir(self, stage: str) -> Path:
        """Where ``stage`` ("analyze", "prune") writes the results of this checkpoint: ``<run_dir>/<stage>``
        for the run's default checkpoint, ``<run_dir>/<stage>@<ckpt stem>`` for any other, so a look at an
        earlier epoch never replaces the trained network's results."""
        return Path(self.run_dir) / f"{stage}{self.tag}"


def _train_command(cfg: DictConfig) -> str:
    parts = [f"name={cfg.name}" if cfg.name != "default" else "", f"data={cfg.data.name}",
             f"model={cfg.model.name}", f"model.width={cfg.model.width}", f"seed={cfg.seed}"]
    return "python train.py " + " ".join(p for p in parts if p)


def locate_run(cfg: DictConfig) -> tuple[Path, Path]:
    """(run_dir, checkpoint) for these overrides, or for ``ckpt=PATH``; one clear line if none.

    A run without ``train_summary.json`` (killed or still training) is refused unless
    ``allow_partial=true``: its ``last.ckpt`` is a partly trained network."""
    if cfg.get("ckpt"):
        ckpt = Path(cfg.ckpt).resolve()
        if not ckpt.is_file():
            raise UserError(f"ckpt={cfg.ckpt} does not exist")
        run = trained_run_dir(cfg)   # where outputs go (under output_root/external/ for a foreign ckpt)
        if ckpt.parent.name == "checkpoints":   # a run's own checkpoint: that run must be finished
            check_finished(cfg, ckpt.parent.parent)
        return run, ckpt
    for cand in run_dir_candidates(cfg):
        for name in ("best.ckpt", "last.ckpt"):
            if (cand / "checkpoints" / name).is_file():
                check_finished(cfg, cand)
                return cand, cand / "checkpoints" / name
    raise UserError(f"no trained run at {run_dir_candidates(cfg)[0]}; train it first with "
                    f"`{_train_command(cfg)}` (or pass ckpt=PATH)")


def default_ckpt(run: Path) -> Path | None:
    """The checkpoint a stage uses when none is named: ``best.ckpt``, else ``last.ckpt``; None if neither."""
    for name in ("best.ckpt", "last.ckpt"):
        if (Path(run) / "checkpoints" / name).is_file():
            return Path(run) / "checkpoints" / name
    return None


def results_tag(run: Path, ckpt: Path) -> str:
    """"" when ``ckpt`` is the run's default checkpoint (or the run has none: a foreign checkpoint owns its
    folder), else ``"@<stem>"``: the suffix of the stage folders that hold that checkpoint's results."""
    default = default_ckpt(run)
    if default is None or default.resolve() == Path(ckpt).resolve():
        return ""
    return f"@{Path(ckpt).stem}"


def check_data_identity(cfg: DictConfig, run: Path) -> None:
    """Refuse data settings that would show this stage other images than the run was trained on: another
    split (``data.split_seed``, ``data.val_fraction``) puts training images into the held-out splits. The
    run's ``train_settings.json`` records its data identity (:func:`runs.data_identity`); a run without
    one (older, or a foreign checkpoint) cannot be checked."""
    path = Path(run) / "train_settings.json"
    try:
        recorded = read_json(path)
    except (OSError, ValueError):
        return
    have = {k: v for k, v in recorded.items() if k.startswith("data.") and k[5:] not in DATA_KEYS_NOT_IDENTITY}
    want = data_identity(cfg.data)
    if have and have != want:
        raise UserError(f"{run} was trained on other data ({settings_diff(have, want)}); its held-out splits would "
                        f"hold training images: use the data.* settings it was trained with")


def check_finished(cfg: DictConfig, run: Path) -> None:
    """Refuse a run whose training did not finish (no ``train_summary.json``), unless allow_partial."""
    if (Path(run) / "train_summary.json").is_file():
        return
    if bool(cfg.get("allow_partial", False)):
        log.warning("using the partly trained run %s (no train_summary.json; allow_partial=true)", run)
        return
    raise UserError(f"run {run} is not finished (no train_summary.json: training was interrupted or is still "
                    f"running); finish it with `{_train_command(cfg)}` or pass allow_partial=true to use it as is")


def expected_meta(cfg: DictConfig, num_classes: int) -> dict:
    """The checkpoint meta this config needs (see checkpoints.check_meta)."""
    return {"model": cfg.model.name, "num_classes": int(num_classes), "width": float(cfg.model.width),
            "data": cfg.data.name, "image_size": int(cfg.data.image_size)}


def architecture(cfg: DictConfig, num_classes: int) -> torch.nn.Module:
    """The backbone of ``cfg`` without initial weights: a checkpoint is about to overwrite every
    tensor, so fetching ImageNet weights (``model.pretrained``/``model.weights``, which headline
    experiments set) would only cost a download, or fail offline, for nothing."""
    from omegaconf import open_dict

    bare = cfg.copy()
    with open_dict(bare):
        bare.model.pretrained = False
        bare.model.weights = None
    return instantiate_model(bare, num_classes)


def restore_trained(cfg: DictConfig, ckpt: Path | None = None) -> Trained:
    """Datamodule + backbone with the run's weights (eval mode, CPU); checks meta matches."""
    out, found = locate_run(cfg)
    ckpt = Path(ckpt) if ckpt is not None else found
    dm = build_datamodule(cfg)
    dm.check()
    model = architecture(cfg, dm.num_classes)
    meta = load_into(model, ckpt, expect=expected_meta(cfg, dm.num_classes))
    # after the checkpoint's own meta check (which names another dataset or image size more plainly), before
    # any stage work: the split and every other data identity key must be the ones the run was trained on
    owner = ckpt.resolve().parent.parent if ckpt.resolve().parent.name == "checkpoints" else out
    check_data_identity(cfg, owner)
    model.eval()
    return Trained(run_dir=out, ckpt=ckpt, model=model, datamodule=dm, meta=meta, tag=results_tag(out, ckpt))
