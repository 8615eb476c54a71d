"""conf/trainer: its schema, and the Trainer of ``trainer=ddp``.

One config serves a GPU box (bf16, synchronised BatchNorm) and ``trainer.accelerator=cpu
trainer.devices=2`` (gloo, the CI test): ``auto`` in ``precision`` and ``sync_batchnorm`` is
resolved here, because torch's SyncBatchNorm is CUDA-only and bf16 autocast on a CPU is a slow
emulation, not the GPU recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from axes_pipeline.bounds import bounded, count
from axes_pipeline.errors import UserError


@dataclass
class TrainerConfig:
    """conf/trainer (cpu, gpu, ddp): ``lightning.Trainer``'s own argument names. Training adds the
    callbacks, the logger, the progress bar and its run directory."""

    _target_: str = "lightning.Trainer"          # ddp: ddp_trainer (below)
    accelerator: str = "cpu"
    devices: Any = 1                             # a count, a list of devices, -1 (all) or auto
    precision: str = "32-true"                   # gpu: bf16-mixed; ddp: auto (by device)
    max_epochs: int = count("${data.recipe.epochs}")
    log_every_n_steps: int = count(10)
    num_sanity_val_steps: int = bounded(0, -1)     # -1: every validation batch (Lightning)
    enable_model_summary: bool = False
    deterministic: Any = False                   # true, false or warn
    benchmark: bool = False
    strategy: str = "auto"                       # ddp: ddp
    sync_batchnorm: Any = False                  # ddp: auto (true on GPUs; torch's SyncBatchNorm is CUDA-only)
    use_distributed_sampler: bool = True
    # a few batches (a count) or a fraction of each split (smoke tests, conf/debug/fast.yaml)
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None


def ddp_trainer(*, accelerator: str = "auto", precision: str = "auto", sync_batchnorm="auto", **kwargs) -> L.Trainer:
    """``lightning.Trainer`` with ``precision``/``sync_batchnorm`` ``auto`` resolved for the device."""
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if precision == "auto":
        precision = "bf16-mixed" if gpu else "32-true"
    if sync_batchnorm == "auto":
        sync_batchnorm = gpu
    elif sync_batchnorm and not gpu:
        raise UserError("trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm is CUDA-only); "
                        "use trainer.sync_batchnorm=auto or false with trainer.accelerator=cpu")
    return L.Trainer(accelerator=accelerator, precision=precision, sync_batchnorm=bool(sync_batchnorm), **kwargs)
