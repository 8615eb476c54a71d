"""Training throughput: the Lightning loop vs a plain PyTorch loop (same model, data, optimizer),
and the on-device data path vs the DataLoader path, measured in the same run.

    python benchmarks/bench_train.py [--epochs 5]

Prints images/s and the ratios. Target: Lightning overhead ≤ 10%.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from bench_scale import write_fake_cifar100  # the one writer of fake CIFAR-100 files (benchmarks/)

from axes_pipeline.data import Cifar100DataModule, DigitsDataModule
from axes_pipeline.models import build_model
from axes_pipeline.training import ClassifierModule, optimizer_factory
from axes_pipeline.training.optim import OptimConfig, warmup_cosine

SGD = optimizer_factory(OptimConfig(name="sgd", lr=0.05, weight_decay=5e-4))   # the CIFAR-100 recipe's


def plain_loop(model, loader, epochs: int) -> float:
    opt = SGD(model.parameters())
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total))
    model.train()
    images, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            images += len(y)
    return images / (time.perf_counter() - t0)


def lightning_loop(model, dm, epochs: int) -> float:
    module = ClassifierModule(model, SGD, dm.num_classes)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    images = epochs * len(dm.dataset("train"))
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    return images / (time.perf_counter() - t0)


def data_paths(n_train: int = 5000, batches: int = 30) -> tuple[float, float]:
    """Images/s of producing augmented CIFAR training batches: PIL DataLoader vs on-device tensors."""
    with tempfile.TemporaryDirectory() as tmp:
        write_fake_cifar100(Path(tmp), n_train, 100)
        rates = []
        for on_device in (False, True):
            dm = Cifar100DataModule(name="cifar100", data_dir=tmp, verify=False, batch_size=128, num_workers=0,
                                    on_device=on_device)
            dm.setup("fit")
            loader = dm.train_dataloader()
            it = iter(loader)
            next(it)  # warm-up (device copy, first worker start)
            images, t0 = 0, time.perf_counter()
            for _, (_x, y) in zip(range(batches), it):
                images += len(y)
            rates.append(images / (time.perf_counter() - t0))
        return rates[0], rates[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    dm = DigitsDataModule(name="digits", batch_size=64, num_workers=0)
    dm.setup("fit")
    L.seed_everything(0, verbose=False)
    model = build_model("resnet18", dm.num_classes, width=0.25)
    plain_loop(model, dm.train_dataloader(), 1)  # warm-up: allocator, kernels
    rates = {}
    for name in ("plain", "lightning", "plain ", "lightning "):  # interleaved twice against drift
        L.seed_everything(0, verbose=False)
        model = build_model("resnet18", dm.num_classes, width=0.25)
        rate = (plain_loop(model, dm.train_dataloader(), args.epochs) if name.startswith("plain")
                else lightning_loop(model, dm, args.epochs))
        rates.setdefault(name.strip(), []).append(rate)
    plain, light = max(rates["plain"]), max(rates["lightning"])
    print(f"digits, ResNet-18 w0.25, batch 64, {args.epochs} epochs, {torch.get_num_threads()} threads (best of 2)")
    print(f"  plain PyTorch loop : {plain:8.1f} images/s")
    print(f"  Lightning loop     : {light:8.1f} images/s")
    print(f"  Lightning overhead : {100 * (plain / light - 1):+.1f}%  (target ≤ 10%)")
    dl, dev = data_paths()
    print("CIFAR-100 format, 32x32, crop+flip, batch 128, batches produced (no model):")
    print(f"  DataLoader (PIL, 0 workers) : {dl:9.1f} images/s")
    print(f"  on-device tensors ({'cuda' if torch.cuda.is_available() else 'cpu'})     : {dev:9.1f} images/s")
    print(f"  on-device / DataLoader      : {dev / dl:.1f}x")


if __name__ == "__main__":
    main()
