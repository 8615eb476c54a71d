"""The LightningModule: cross-entropy classification with top-1/top-5, recipe optimizer, cosine LR."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from axes_pipeline.training.optim import warmup_cosine


class ClassifierModule(L.LightningModule):
    """Wraps a backbone for training. ``optimizer``: ``params -> Optimizer``. ``meta`` (model, width,
    class count, data...) is stored in every checkpoint so later stages can refuse another model's."""

    def __init__(self, model: torch.nn.Module, optimizer: Callable, num_classes: int,
                 label_smoothing: float = 0.0, warmup_epochs: int = 0,
                 channels_last: bool = False, meta: dict | None = None):
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.label_smoothing = label_smoothing
        self.warmup_epochs = warmup_epochs
        self.channels_last = channels_last
        self.meta = dict(meta or {})
        top5 = min(5, num_classes)
        self.metrics = torch.nn.ModuleDict({
            f"{split}_{k}": MulticlassAccuracy(num_classes, top_k=t, average="micro")
            for split in ("train", "val", "test") for k, t in (("acc", 1), ("acc5", top5))
            if (split, k) != ("train", "acc5")
        })
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _step(self, batch, split: str):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing if split == "train" else 0.0)
        on_step = split == "train"
        # val/test loss averaged over DDP ranks (each rank sees a shard); the accuracies are
        # torchmetrics objects, which sync themselves. Training loss stays per rank (no per-step sync).
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(y),
                 sync_dist=not on_step)
        # update() only: the metrics are logged per epoch, so the per-batch value that calling the
        # metric would also compute is wasted work; top-5 during training is not worth its top-k.
        for k in (("acc",) if split == "train" else ("acc", "acc5")):
            metric = self.metrics[f"{split}_{k}"]
            metric.update(logits.detach(), y)
            self.log(f"{split}/{k}", metric, on_step=False, on_epoch=True, prog_bar=(k == "acc"))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameters())
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, self.warmup_epochs * per_epoch))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain containers only, so checkpoints load with torch.load(weights_only=True).
        checkpoint["axes_meta"] = dict(self.meta, epoch=int(self.current_epoch))
