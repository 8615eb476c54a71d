"""Training: the LightningModule, recipe optimizers, checkpoints (epoch 0 included), restore."""

from axes_pipeline.training.checkpoints import EpochCheckpoint, epoch_checkpoints, load_into, read_checkpoint
from axes_pipeline.training.module import ClassifierModule
from axes_pipeline.training.optim import optimizer_factory

__all__ = ["ClassifierModule", "EpochCheckpoint", "epoch_checkpoints", "load_into", "optimizer_factory",
           "read_checkpoint"]
