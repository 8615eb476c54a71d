"""Find a trained run and restore its model, for the analysis and pruning stages."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from axes_pipeline.data import build_datamodule
from axes_pipeline.environment import differs, environment
from axes_pipeline.errors import UserError
from axes_pipeline.layout import CHECKPOINTS, RunLayout
from axes_pipeline.runs import DATA_KEYS_NOT_IDENTITY, read_json, settings_diff
from axes_pipeline.stage import StageInputs
from axes_pipeline.training.checkpoints import load_into
from axes_pipeline.training.train import instantiate_model

log = logging.getLogger("axes_pipeline")

_ANNOUNCED: set[Path] = set()


@dataclass
class Trained:
    run: RunLayout       # where this stage writes (the trained run's folder, or external/ for a foreign ckpt)
    ckpt: Path
    model: torch.nn.Module
    datamodule: object
    meta: dict
    data_id: dict        # the data identity (runs.data_identity): part of every result's fingerprint
    #: "" for the run's default checkpoint, "@<stem>" for another one (:func:`results_tag`)
    tag: str = ""

    @property
    def run_dir(self) -> Path:
        return self.run.dir

    def stage_dir(self, stage: str) -> Path:
        """Where ``stage`` ("analyze", "prune") writes the results of this checkpoint (:meth:`RunLayout.stage_dir`):
        a look at an earlier epoch never replaces the trained network's results."""
        return self.run.stage_dir(stage, self.tag)

    def protocol_dir(self, protocol: str) -> Path:
        """Where pruning protocol ``protocol`` writes this checkpoint's results (:meth:`RunLayout.protocol_dir`)."""
        return self.run.protocol_dir(protocol, self.tag)


def locate_run(run: RunLayout, ckpt: Path | None = None, allow_partial: bool = False) -> tuple[RunLayout, Path]:
    """(the run's layout, checkpoint) for this run, or for ``ckpt=PATH``; one clear line if none.

    A run without ``train_summary.json`` (killed or still training) is refused unless
    ``allow_partial``: its ``last.ckpt`` is a partly trained network."""
    if ckpt is not None:
        path = Path(ckpt).resolve()
        if not path.is_file():
            raise UserError(f"ckpt={ckpt} does not exist")
        owner = run.for_checkpoint(path)   # where outputs go (under output_root/external/ for a foreign ckpt)
        if owner.is_external and owner.dir not in _ANNOUNCED:
            _ANNOUNCED.add(owner.dir)
            print(f"ckpt={ckpt} lies outside paths.output_root ({run.root}); writing to {owner.dir}")
        if path.parent.name == CHECKPOINTS:   # a run's own checkpoint: that run must be finished
            check_finished(run.in_folder(path.parent.parent), allow_partial)
        return owner, path
    for cand in run.candidates():
        found = run.in_folder(cand)
        default = found.default_ckpt()
        if default is not None:
            check_finished(found, allow_partial)
            return found, default
    raise UserError(f"no trained run at {run.candidates()[0]}; train it first with `{run.command('train')}` "
                    f"(or pass ckpt=PATH)")


def results_tag(run: RunLayout, ckpt: Path) -> str:
    """"" when ``ckpt`` is the run's default checkpoint (or the run has none: a foreign checkpoint owns its
    folder), else ``"@<stem>"``: the suffix of the stage folders that hold that checkpoint's results."""
    default = run.default_ckpt()
    if default is None or default.resolve() == Path(ckpt).resolve():
        return ""
    return f"@{Path(ckpt).stem}"


def check_data_identity(data_id: dict, run: RunLayout) -> None:
    """Refuse data settings that would show this stage other images than the run was trained on: another
    split (``data.split_seed``, ``data.val_fraction``) puts training images into the held-out splits. The
    run's ``train_settings.json`` records its data identity (:func:`runs.data_identity`); a run without
    one (older, or a foreign checkpoint) cannot be checked."""
    try:
        recorded = read_json(run.train_settings)
    except (OSError, ValueError):
        return
    have = {k: v for k, v in recorded.items() if k.startswith("data.") and k[5:] not in DATA_KEYS_NOT_IDENTITY}
    if have and have != data_id:
        raise UserError(f"{run.dir} was trained on other data ({settings_diff(have, data_id)}); its held-out splits "
                        f"would hold training images: use the data.* settings it was trained with")


def check_environment(run: RunLayout) -> None:
    """One line when this stage runs in another environment (threads, processor, torch build) than the run was
    trained in: its numbers are then close to, not bit-identical with, those computed there. Never a refusal."""
    try:
        recorded = read_json(run.train_summary).get("environment")
    except (OSError, ValueError, AttributeError):
        return
    why = differs(recorded, environment())
    if why:   # one line: under Hydra the log's console handler shows it, and <stage>.log keeps it
        log.warning("%s was trained in another environment (%s); results computed here may differ in their last "
                    "digits from those computed there", run.dir, why)


def check_finished(run: RunLayout, allow_partial: bool) -> None:
    """Refuse a run whose training did not finish (no ``train_summary.json``), unless ``allow_partial``."""
    if run.train_summary.is_file():
        return
    if allow_partial:
        log.warning("using the partly trained run %s (no train_summary.json; allow_partial=true)", run.dir)
        return
    raise UserError(f"run {run.dir} is not finished (no train_summary.json: training was interrupted or is still "
                    f"running); finish it with `{run.command('train')}` or pass allow_partial=true to use it as is")


def expected_meta(run: RunLayout, num_classes: int, image_size: int) -> dict:
    """The checkpoint meta this run needs (see checkpoints.check_meta)."""
    return {"model": run.id.model, "num_classes": int(num_classes), "width": run.id.width,
            "data": run.id.data, "image_size": int(image_size)}


def architecture(model: DictConfig, num_classes: int) -> torch.nn.Module:
    """The backbone of the ``model`` block without initial weights: a checkpoint is about to overwrite
    every tensor, so fetching ImageNet weights (``model.pretrained``/``model.weights``, which headline
    experiments set) would only cost a download, or fail offline, for nothing."""
    return instantiate_model(OmegaConf.merge(model, {"pretrained": False, "weights": None}), num_classes)


def restore_trained(inputs: StageInputs) -> Trained:
    """Datamodule + backbone with the weights of the run ``inputs`` name (its default checkpoint, or
    ``ckpt=``), in eval mode on the CPU; checks the checkpoint's meta and the data identity match."""
    run = inputs.run
    out, path = locate_run(run, inputs.ckpt, inputs.allow_partial)
    dm = build_datamodule(inputs.data)
    dm.check()
    net = architecture(inputs.model, dm.num_classes)
    meta = load_into(net, path, expect=expected_meta(run, dm.num_classes, dm.image_size))
    # after the checkpoint's own meta check (which names another dataset or image size more plainly), before
    # any stage work: the split and every other data identity key must be the ones the run was trained on
    owner = run.in_folder(path.resolve().parent.parent) if path.resolve().parent.name == CHECKPOINTS else out
    check_data_identity(inputs.data_id, owner)
    check_environment(owner)
    net.eval()
    return Trained(run=out, ckpt=path, model=net, datamodule=dm, meta=meta, data_id=inputs.data_id,
                   tag=results_tag(out, path))
