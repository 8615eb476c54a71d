"""Training: the LightningModule, recipe optimizers, checkpoints (epoch 0 included), restore."""

from axes_pipeline.training.checkpoints import EpochCheckpoint, epoch_checkpoints, load_into, read_checkpoint
from axes_pipeline.training.module import ClassifierModule
from axes_pipeline.training.optim import make_optimizer

__all__ = ["ClassifierModule", "EpochCheckpoint", "epoch_checkpoints", "load_into", "make_optimizer",
           "read_checkpoint"]
