"""run_training(cfg): the body of train.py."""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from axes_pipeline.config import check_positive, run_dir, to_container
from axes_pipeline.errors import UserError
from axes_pipeline.runs import read_json, write_json
from axes_pipeline.training.checkpoints import EpochCheckpoint
from axes_pipeline.training.module import ClassifierModule

log = logging.getLogger("axes_pipeline")


def instantiate_model(cfg: DictConfig, num_classes: int) -> torch.nn.Module:
    """Build the backbone from ``cfg.model`` (the recipe block is for the optimizer, not the model)."""
    model_cfg = {k: v for k, v in cfg.model.items() if k != "recipe"}
    return instantiate(model_cfg, _recursive_=False)(num_classes=num_classes)


def build_datamodule(cfg: DictConfig):
    from axes_pipeline.data import build_datamodule as _build

    return _build(cfg.data)


def check_trainer(cfg: DictConfig) -> None:
    """Refuse settings that would fail late, before any expensive work."""
    check_positive(cfg.trainer.max_epochs, "trainer.max_epochs")
    check_positive(cfg.data.batch_size, "data.batch_size")
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError("trainer=gpu but no CUDA GPU is visible on this machine; use trainer=cpu")


def model_meta(cfg: DictConfig, num_classes: int) -> dict:
    # data, image_size and num_classes let a later stage refuse a checkpoint of another dataset
    # that happens to have the same class count (restore.check_meta).
    return {"model": cfg.model.name, "width": float(cfg.model.width), "num_classes": int(num_classes),
            "data": cfg.data.name, "image_size": int(cfg.data.image_size), "seed": int(cfg.seed),
            "experiment": cfg.name}


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
    check_trainer(cfg)
    out = run_dir(cfg)
    summary_path = out / "train_summary.json"
    ckpt_dir = out / "checkpoints"
    max_epochs = int(cfg.trainer.max_epochs)
    if summary_path.exists():
        done = read_json(summary_path)
        if done.get("epochs") == max_epochs and (ckpt_dir / "last.ckpt").exists():
            log.info("training already complete (%d epochs): %s", max_epochs, summary_path)
            print(f"train: already complete, nothing to do ({summary_path})")
            return done

    dm = build_datamodule(cfg)
    dm.check()
    model = instantiate_model(cfg, dm.num_classes)
    channels_last = cfg.train.channels_last
    if channels_last == "auto":
        channels_last = cfg.trainer.accelerator in ("gpu", "cuda")
    module = ClassifierModule(
        model, optimizer=instantiate(cfg.optim), num_classes=dm.num_classes,
        label_smoothing=cfg.train.label_smoothing, warmup_epochs=cfg.train.warmup_epochs,
        channels_last=bool(channels_last), meta=model_meta(cfg, dm.num_classes))
    if cfg.train.compile:
        module.model = torch.compile(module.model)

    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from axes_pipeline.tracking import lightning_logger

    throughput = Throughput()
    callbacks = [
        ModelCheckpoint(dirpath=str(ckpt_dir), filename="best", monitor=cfg.checkpoint.monitor,
                        mode=cfg.checkpoint.mode, save_last=True, save_top_k=1,
                        enable_version_counter=False, auto_insert_metric_name=False),
        throughput,
    ]
    if cfg.checkpoint.every_epoch:
        callbacks.append(EpochCheckpoint(ckpt_dir))
    logger = lightning_logger(cfg, out)
    if logger and cfg.callbacks.lr_monitor:
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger,
                                     default_root_dir=str(out),
                                     enable_progress_bar=bool(cfg.callbacks.progress_bar))
    resume = ckpt_dir / "last.ckpt"
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume.exists() else None)
    wall = time.perf_counter() - t0
    if trainer.interrupted:
        raise KeyboardInterrupt
    best = ckpt_dir / "best.ckpt"
    val = trainer.validate(module, datamodule=dm, ckpt_path=str(best), verbose=False)[0]
    test = trainer.test(module, datamodule=dm, ckpt_path=str(best), verbose=False)[0]
    summary = {
        "val_acc": val.get("val/acc"), "val_acc5": val.get("val/acc5"), "val_loss": val.get("val/loss"),
        "test_acc": test.get("test/acc"), "test_acc5": test.get("test/acc5"), "test_loss": test.get("test/loss"),
        "epochs": max_epochs, "wall_time_s": round(wall, 2),
        "train_images_per_s": round(throughput.images / throughput.seconds, 1) if throughput.seconds else None,
        "best_checkpoint": str(best), "last_checkpoint": str(resume),
        "num_classes": dm.num_classes, "device": str(trainer.strategy.root_device),
        "config": to_container(cfg),
    }
    write_json(summary_path, summary)
    print(f"train: val_acc={summary['val_acc']:.4f} test_acc={summary['test_acc']:.4f} "
          f"({wall:.1f}s, {summary['train_images_per_s']} img/s) -> {out}")
    return summary
