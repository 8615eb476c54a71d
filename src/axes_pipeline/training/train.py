"""run_training(cfg): the body of train.py."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from axes_pipeline.config import check_positive, to_container
from axes_pipeline.data import build_datamodule
from axes_pipeline.environment import ENVIRONMENT_JSON, differs, environment
from axes_pipeline.errors import UserError
from axes_pipeline.layout import BEST_CKPT, LAST_CKPT, RunId, RunLayout
from axes_pipeline.runs import Stamp, file_digest, fingerprint, no_space_is_one_line, read_json, run_fingerprint, write_json
from axes_pipeline.stage import stage_inputs
from axes_pipeline.training.checkpoints import changed_since_training, load_into, read_checkpoint
from axes_pipeline.training.module import ClassifierModule
from axes_pipeline.training.optim import optimizer_factory, optimizer_target
from axes_pipeline.wiring import instantiate_all

log = logging.getLogger("axes_pipeline")


def instantiate_model(model: DictConfig, num_classes: int) -> torch.nn.Module:
    """Build the backbone from the ``model`` block (its recipe is for the optimizer, not the model)."""
    return instantiate({k: v for k, v in model.items() if k != "recipe"}, _recursive_=False)(num_classes=num_classes)


def check_trainer(max_epochs: int, batch_size: int, optimizer: str, accelerator: str) -> None:
    """Refuse settings that would fail late, before any expensive work."""
    check_positive(max_epochs, "trainer.max_epochs")
    check_positive(batch_size, "data.batch_size")
    optimizer_target(optimizer)   # an unknown optim.name: one line now, not a resolver traceback later
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError("trainer=gpu but no CUDA GPU is visible on this machine; use trainer=cpu")


def model_meta(run_id: RunId, image_size: int, num_classes: int) -> dict:
    # data, image_size and num_classes let a later stage refuse a checkpoint of another dataset
    # that happens to have the same class count (restore.check_meta).
    return {"model": run_id.model, "width": run_id.width, "num_classes": int(num_classes),
            "data": run_id.data, "image_size": int(image_size), "seed": run_id.seed, "experiment": run_id.name}


def train_settings(data_id: dict, model: dict, optim: dict, recipe: dict, init_ckpt: Path | None) -> dict:
    """Everything that decides the trained weights besides the run folder's own parts: the data identity,
    the model's other knobs (``model``: the block as plain values), the optimizer (``optim``), the recipe
    (``recipe``: batch size, label smoothing, warm-up, epochs, precision, batches per epoch) and the
    content of an initialising ``ckpt=``. Stored as ``train_settings.json``, so that a rerun with other
    values is refused with a one-line diff instead of keeping (or resuming into) the old run.
    """
    # from_scratch only guards against pretrained weights: keyed when set, as before it was typed
    model_keys = {f"model.{k}": v for k, v in model.items() if k != "from_scratch" or v}
    optim_keys = {f"optim.{k}": v for k, v in optim.items() if not k.startswith("_")}
    parts = run_fingerprint(data_id, init_ckpt, **model_keys, **optim_keys, **recipe)
    if "ckpt_digest" in parts:        # an initialisation, not a checkpoint of this run
        parts["init_ckpt_digest"] = parts.pop("ckpt_digest")
    return parts


def record_environment(out: Path, resuming: bool) -> tuple[dict, dict | None]:
    """``(environment, resumed)``: the environment the run was started in (``environment.json``, written at a fresh
    start) and, when this resume runs under another, the current one (else None), said in one line: the resumed
    weights are then not bit-identical to an uninterrupted run's (docs/reliability.md)."""
    now, path = environment(), out / ENVIRONMENT_JSON
    try:
        recorded = read_json(path) if resuming else None
    except (OSError, ValueError):
        recorded = None
    if recorded is None:
        write_json(path, now)
        return now, None
    why = differs(recorded, now)
    if why is None:
        return recorded, None
    # one line: under Hydra the log's console handler shows it, and train.log keeps it
    log.warning("resuming %s under another environment than it started in (%s): its weights will not be "
                "bit-identical to an uninterrupted run's", out, why)
    return recorded, now


def check_settings(run: RunLayout, want: dict) -> None:
    """Refuse to reuse or resume a run folder whose run was started with other settings."""
    if run.train_settings.exists() and (why := Stamp(run.train_settings, want).why_not()) is not None:
        raise UserError(f"{run.dir} holds a run trained with {why}; give this variant its own name= (e.g. "
                        f"name=lr0.5 for another optim.lr), or delete that directory to retrain")


RESUME_KEYS = ("state_dict", "optimizer_states", "loops", "epoch", "global_step")


def check_complete(out: Path, max_epochs: int) -> None:
    """A run that says it is complete (``train_summary.json``) is skipped only when its checkpoints
    are: ``best.ckpt`` (what analyze and prune read) and ``last.ckpt`` load (a truncated file, from a
    full disk or a copy cut short, does not) and are the files training wrote (their content digests,
    recorded in ``train_summary.json``). Otherwise one
    line says what was found and how to retrain; nothing is deleted on the user's behalf."""
    found = []
    for name, keys in (("best.ckpt", ("state_dict",)), ("last.ckpt", RESUME_KEYS)):
        path = out / "checkpoints" / name
        try:
            ckpt = read_checkpoint(path)
        except UserError as err:
            found.append(str(err))
            continue
        missing = [k for k in keys if k not in ckpt]
        if missing:
            found.append(f"checkpoint {path} has no {', '.join(missing)}")
        # (not its epoch: Lightning's last.ckpt is the last *saved* one, the best epoch's when validation
        # stopped improving, so a sound finished run may hold an earlier epoch there)
        elif (changed := changed_since_training(path)) is not None:
            found.append(changed)
    if found:
        raise UserError(f"{out / 'train_summary.json'} says training is complete, but {'; '.join(found)}; "
                        f"to retrain this run, delete {out / 'checkpoints'} and {out / 'train_summary.json'}")


def resume_point(out: Path) -> tuple[Path | None, int, int]:
    """(``last.ckpt`` to resume from or None, the first epoch and optimizer step this process trains).

    A damaged ``last.ckpt`` is a one-line error that says how to start over, not a traceback from
    deep inside Lightning (nor a silent fresh start that would throw away finished epochs)."""
    last = out / "checkpoints" / "last.ckpt"
    if not last.exists():
        return None, 0, 0
    try:
        ckpt = read_checkpoint(last)
        missing = [k for k in RESUME_KEYS if k not in ckpt]
        if missing:
            raise UserError(f"no {', '.join(missing)}: not a resume point written by train.py")
        epoch, step = int(ckpt["epoch"]), int(ckpt["global_step"])
    except (UserError, TypeError, ValueError) as err:
        raise UserError(f"cannot resume: {last} is damaged ({err}); to start this run over, delete "
                        f"{out} (or only its checkpoints/ and logs/)") from None
    # last.ckpt is written at the end of an epoch (after its validation): the next one starts here.
    return last, epoch + 1, step


def epoch_seed(seed: int, epoch: int) -> int:
    return int(fingerprint({"seed": int(seed), "epoch": int(epoch)}), 16) % (2**32)


class EpochRNG(L.Callback):
    """Make each epoch's randomness a function of (seed, epoch), so a resumed run is the run it resumes.

    Lightning's resume restores weights, optimizer, scheduler and loop counters but not the random
    state: the shuffling of the training loader (its sampler draws from the global generator when
    its iterator is made), augmentation and dropout would continue from the state of the new
    process. Reseeding python, numpy and torch at the start of every epoch from (seed, epoch) is a
    state that the checkpoint's epoch carries. The first epoch of a process is reseeded in
    ``setup``: Lightning makes (and prefetches from) that epoch's iterator while it sets up the
    optimizers (``estimated_stepping_batches``), before ``on_fit_start``; later epochs' iterators
    are made after ``on_train_epoch_start``.
    """

    def __init__(self, seed: int, first_epoch: int):
        self.seed = int(seed)
        self.first_epoch = int(first_epoch)

    def _reseed(self, epoch: int) -> None:
        s = epoch_seed(self.seed, epoch)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":
            self._reseed(self.first_epoch)

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch != self.first_epoch:
            self._reseed(trainer.current_epoch)
        # The logger's rows of finished epochs go to disk now: a kill during this epoch keeps them.
        if trainer.logger is not None:
            trainer.logger.save()


class Throughput(L.Callback):
    """Training images per second, counted over the training batches only (not validation)."""

    def __init__(self):
        self.images = 0
        self.seconds = 0.0
        self._t = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._t is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - self._t
            self.images += len(batch[1])


def run_training(cfg: DictConfig) -> dict:
    """Train (or resume, or skip when complete) and write ``train_summary.json`` next to checkpoints."""
    inputs = stage_inputs(cfg)
    trainer_cfg, train = cfg.trainer, cfg.train
    check_trainer(trainer_cfg.max_epochs, cfg.data.batch_size, cfg.optim.name, trainer_cfg.accelerator)
    run, init = inputs.run, inputs.ckpt
    out = run.dir
    ckpt_dir = run.checkpoints
    max_epochs = int(trainer_cfg.max_epochs)
    if init is not None and not init.is_file():
        raise UserError(f"ckpt={init} does not exist (train.py uses it as the initial weights)")
    recipe = {"data.batch_size": int(cfg.data.batch_size), "train.label_smoothing": float(train.label_smoothing),
              "train.warmup_epochs": int(train.warmup_epochs), "trainer.max_epochs": max_epochs,
              "trainer.precision": str(trainer_cfg.precision),
              "trainer.limit_train_batches": trainer_cfg.limit_train_batches}
    settings = train_settings(inputs.data_id, to_container(cfg.model), to_container(cfg.optim), recipe, init)
    check_settings(run, settings)
    if run.train_summary.exists():
        done = read_json(run.train_summary)
        if done.get("epochs") == max_epochs and (ckpt_dir / LAST_CKPT).exists():
            check_complete(out, max_epochs)
            log.info("training already complete (%d epochs): %s", max_epochs, run.train_summary)
            print(f"train: already complete, nothing to do ({run.train_summary})")
            return done

    resume, first_epoch, first_step = resume_point(out)
    dm = build_datamodule(inputs.data)
    dm.check()
    model = instantiate_model(inputs.model, dm.num_classes)
    if init is not None:   # initial weights only (optimizer, schedule and epoch start afresh) of this model and data
        load_into(model, init, expect={"model": run.id.model, "width": run.id.width,
                                       "num_classes": int(dm.num_classes), "data": run.id.data})
        log.info("initialised the weights from ckpt=%s", init)
    write_json(run.train_settings, settings)
    channels_last = train.channels_last
    if channels_last == "auto":
        channels_last = trainer_cfg.accelerator in ("gpu", "cuda")
    module = ClassifierModule(
        model, optimizer=optimizer_factory(cfg.optim), num_classes=dm.num_classes,
        label_smoothing=train.label_smoothing, warmup_epochs=train.warmup_epochs,
        channels_last=bool(channels_last), meta=model_meta(run.id, dm.image_size, dm.num_classes))
    if train.compile:
        module.model = torch.compile(module.model)

    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar

    throughput = Throughput()
    # Throughput and EpochRNG are no options: the summary reads one, a resume needs the other.
    callbacks = [throughput, EpochRNG(run.id.seed, first_epoch), *instantiate_all(cfg.callbacks, "callbacks")]
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        raise UserError("callbacks.model_checkpoint cannot be left out: it writes best.ckpt (validated and "
                        "tested below, read by analyze.py and prune.py) and last.ckpt (the resume point)")
    tracked = inputs.tracked
    backend = tracked.backend
    logger = backend.training_logger(tracked, out, first_epoch, first_step) if backend is not None else False
    if not logger:   # Lightning refuses a learning-rate monitor without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=logger,
                                     default_root_dir=str(out),
                                     enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks))
    if resume is not None:
        log.info("resuming %s at epoch %d", resume, first_epoch)
    env, resumed_env = record_environment(out, resume is not None)
    t0 = time.perf_counter()
    with no_space_is_one_line(ckpt_dir):   # Lightning's own writes: last.ckpt, best.ckpt, the logger's files
        trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume is not None else None)
    wall = time.perf_counter() - t0
    if trainer.interrupted:
        raise KeyboardInterrupt
    best = ckpt_dir / BEST_CKPT
    val = trainer.validate(module, datamodule=dm, ckpt_path=str(best), verbose=False)[0]
    test = trainer.test(module, datamodule=dm, ckpt_path=str(best), verbose=False)[0]
    summary = {
        "val_acc": val.get("val/acc"), "val_acc5": val.get("val/acc5"), "val_loss": val.get("val/loss"),
        "test_acc": test.get("test/acc"), "test_acc5": test.get("test/acc5"), "test_loss": test.get("test/loss"),
        "epochs": max_epochs, "wall_time_s": round(wall, 2),
        "train_images_per_s": round(throughput.images / throughput.seconds, 1) if throughput.seconds else None,
        "best_checkpoint": str(best), "last_checkpoint": str(ckpt_dir / LAST_CKPT),
        "num_classes": dm.num_classes, "device": str(trainer.strategy.root_device),
        "config": inputs.config, "environment": env,
    }
    if resumed_env is not None:   # part of the epochs ran elsewhere: the report says so beside the seed
        summary["resumed_environment"] = resumed_env
    if not trainer.is_global_zero:   # under DDP every rank gets here: one summary, one log line
        return summary
    # what training wrote, by content: every later read (restore_trained, the skip check) verifies it
    summary["checkpoint_digests"] = {p.name: file_digest(p) for p in sorted(ckpt_dir.glob("*.ckpt"))}
    write_json(run.train_summary, summary)
    if backend is not None:
        backend.record_training(logger, tracked, best, summary)
    print(f"train: val_acc={summary['val_acc']:.4f} test_acc={summary['test_acc']:.4f} "
          f"({wall:.1f}s, {summary['train_images_per_s']} img/s) -> {out}")
    return summary
