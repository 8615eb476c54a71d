"""The Trainer of ``trainer=ddp``: the GPU defaults where there are GPUs, what works on CPU where not.

One config serves both: ``trainer=ddp`` on a GPU box (bf16, synchronised BatchNorm) and
``trainer=ddp trainer.accelerator=cpu trainer.devices=2`` (gloo, the CI test). ``auto`` in
``precision`` and ``sync_batchnorm`` is resolved here, because torch's SyncBatchNorm is CUDA-only
(on CPU DDP fails with "SyncBatchNorm layers only work with GPU modules") and bf16 autocast on a
CPU is a slow emulation, not the GPU recipe.
"""

from __future__ import annotations

import lightning as L
import torch

from axes_pipeline.errors import UserError


def on_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def ddp_trainer(*, accelerator: str = "auto", precision: str = "auto", sync_batchnorm="auto", **kwargs) -> L.Trainer:
    """``lightning.Trainer`` with ``precision``/``sync_batchnorm`` ``auto`` resolved for the device."""
    gpu = on_gpu(str(accelerator))
    if precision == "auto":
        precision = "bf16-mixed" if gpu else "32-true"
    if sync_batchnorm == "auto":
        sync_batchnorm = gpu
    elif sync_batchnorm and not gpu:
        raise UserError("trainer.sync_batchnorm=true needs GPUs (torch's SyncBatchNorm is CUDA-only); "
                        "use trainer.sync_batchnorm=auto or false with trainer.accelerator=cpu")
    return L.Trainer(accelerator=accelerator, precision=precision, sync_batchnorm=bool(sync_batchnorm), **kwargs)
