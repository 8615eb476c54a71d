"""Evaluating a pruned network: accuracy (on the test and validation splits), an optional short
fine-tune, latency.

A sweep evaluates hundreds of networks on the same two splits. Their batches are deterministic (eval
transform, no shuffle), so each split is read once per datamodule and held (:func:`held_batches`)
instead of running every image's decode and transform again for every point (on the demo's seed 42,
252 points: evaluation 20.7 s instead of 25.7 s). A split larger than :data:`HOLD_MAX_BYTES` streams.
"""

from __future__ import annotations

import copy
import statistics
import time
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from axes_pipeline.models.modes import eval_mode
from axes_pipeline.training.optim import OptimConfig, optimizer_factory

__all__ = ["HOLD_MAX_BYTES", "evaluate", "evaluate_splits", "evaluate_test_val", "finetune", "held_batches", "latency"]

#: the largest evaluation split held in memory as float batches (CIFAR's test split is 123 MB,
#: Tiny-ImageNet's validation split 491 MB, ImageNet-100's 3 GB: it streams)
HOLD_MAX_BYTES = 512 * 2**20

#: {datamodule: {split key: [(x, y), ...]}}: the held batches, dropped with their datamodule
_HELD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device) -> dict:
    """Top-1, top-5 accuracy and mean cross-entropy of ``model`` over ``loader`` (eval mode)."""
    n, loss = 0, 0.0
    top1 = top5 = None  # built on the first batch: torchmetrics needs num_classes
    with eval_mode(model):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x).float()
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            if top1 is None:
                top1, top5 = accuracy_metrics(logits.shape[1], device)
            top1.update(logits, y)
            if top5 is not None:
                top5.update(logits, y)
            n += len(y)
    if n == 0:
        return {"acc": float("nan"), "top5": float("nan"), "loss": float("nan"), "n": 0}
    # With fewer than 5 classes the 5 best guesses hold every class, so top-5 is 1 by definition
    # (the former topk(min(5, C)) rule); torchmetrics refuses top_k > num_classes.
    acc5 = float(top5.compute()) if top5 is not None else 1.0
    return {"acc": float(top1.compute()), "top5": acc5, "loss": loss / n, "n": n}


def accuracy_metrics(num_classes: int, device: torch.device):
    """Top-1 and top-5 accuracy (micro average = correct / n) from torchmetrics; top-5 is None below 5 classes."""
    from torchmetrics.classification import MulticlassAccuracy

    # float64: the counts are integers, and a float64 quotient equals the former correct / n
    # bit for bit (the default float32 would differ in the 8th digit).
    def make(k):
        return MulticlassAccuracy(num_classes=num_classes, top_k=k, average="micro").set_dtype(torch.float64).to(device)

    return make(1), (make(5) if num_classes >= 5 else None)


def finetune(model: nn.Module, loader, device: torch.device, epochs: int, max_batches: int | None,
             lr: float, optimizer: str = "adam", weight_decay: float = 0.0) -> dict:
    """Short fine-tune on the training split (train mode; the final weights are kept, nothing is
    selected on any held-out split). Returns steps, seconds and the mean loss of the last epoch."""
    opt = optimizer_factory(OptimConfig(name=optimizer, lr=lr, weight_decay=weight_decay))(model.parameters())
    was = model.training
    model.train()
    steps, t0, last = 0, time.perf_counter(), float("nan")
    try:
        for _ in range(int(epochs)):
            total, seen = 0.0, 0
            for b, (x, y) in enumerate(loader):
                if max_batches is not None and b >= max_batches:
                    break
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                total += float(loss.detach()) * len(y)
                seen += len(y)
            last = total / max(1, seen)
    finally:
        model.train(was)
    return {"steps": steps, "seconds": time.perf_counter() - t0, "loss": last}


@torch.inference_mode()
def latency(model: nn.Module, input_shape: tuple[int, ...], batch_sizes=(1, 64), repeats: int = 10,
            warmup: int = 2, devices=("cpu", "cuda"), budget_s: float = 2.0) -> dict[str, float]:
    """Median forward time (ms) per device and batch size: ``{"latency_cpu_b1_ms": ...}``.

    ``cuda`` is skipped when no GPU is visible. The model is copied to each device, eval mode.
    At most ``repeats`` timed forwards, fewer (but at least 3) once ``budget_s`` is spent on one
    (device, batch size): a large batch on a CPU would otherwise dominate a pruning sweep.
    """
    import torch.utils.benchmark as benchmark  # deferred: slow to import, and only latency needs it

    out = {}
    c, h, w = input_shape[-3:]
    for dev in devices:
        if dev == "cuda" and not torch.cuda.is_available():
            continue
        device = torch.device(dev)
        m = copy.deepcopy(model).to(device).eval()
        for bs in batch_sizes:
            x = torch.randn(int(bs), c, h, w, device=device)
            # torch.utils.benchmark.Timer does the CUDA synchronisation and the timer choice; its
            # num_threads defaults to 1, so pass the process's count to time what a run uses.
            # Its autorange methods cannot stop at ``repeats`` forwards (pruning.latency_repeats),
            # so the stopping rule stays here: one timeit(1) per forward, median of those (each
            # timeit call also runs 2 untimed warm-up forwards of its own: the price of the Timer).
            timer = benchmark.Timer(stmt="m(x)", globals={"m": m, "x": x},
                                    num_threads=torch.get_num_threads())
            if int(warmup) > 0:
                timer.timeit(int(warmup))
            times, start = [], time.perf_counter()
            for _ in range(int(repeats)):
                if len(times) >= 3 and time.perf_counter() - start > budget_s:
                    break
                times.append(timer.timeit(1).median * 1e3)
            out[f"latency_{device.type}_b{bs}_ms"] = float(statistics.median(times))
        del m
    return out


def evaluate_test_val(model: nn.Module, dm, settings, device: torch.device) -> tuple[dict, dict | None]:
    """:func:`evaluate` on the test split (or a seeded subset of ``pruning.eval_samples`` of its
    images) and on the validation split training carved from the training data (every "best" is
    chosen on it; None when there is none, ``data.val_fraction=0``)."""
    sizes = dm.split_sizes()
    if settings.eval_samples is None:
        test = held_batches(dm, ("test",), sizes.get("test", 0), dm.test_dataloader)
    else:
        n, seed = int(settings.eval_samples), settings.eval_seed
        test = held_batches(dm, ("test", n, seed), min(n, sizes.get("test", 0)),
                            lambda: dm.loader(dm.eval_subset(n, seed)))
    val = held_batches(dm, ("val",), sizes["val"], dm.val_dataloader) if sizes.get("val", 0) > 0 else None
    return evaluate(model, test, device), (evaluate(model, val, device) if val is not None else None)


def held_batches(dm, key: tuple, n_images: int, make_loader):
    """The evaluation batches of ``make_loader()`` (split ``key`` of ``dm``, ``n_images`` images), read
    once per datamodule and held when they fit in :data:`HOLD_MAX_BYTES`; else the loader itself.

    Only for loaders whose batches never change between passes (eval transform, no shuffle): a held
    pass yields the very tensors a fresh loader would, in the same order, so accuracies are unchanged.
    """
    side = getattr(dm, "image_size", None)   # a user's datamodule may not say: it streams
    per_image = int(getattr(dm, "in_channels", 3)) * int(side or 0) ** 2 * 4   # float32 pixels
    # data.on_device: the split already sits on the device and each batch is a few tensor ops
    if not side or getattr(dm, "on_device", False) or n_images * per_image > HOLD_MAX_BYTES:
        return make_loader()
    try:
        held = _HELD.setdefault(dm, {})
    except TypeError:   # a datamodule that cannot be weakly referenced: stream
        return make_loader()
    if key not in held:
        held[key] = list(make_loader())
    return held[key]


def evaluate_splits(model: nn.Module, dm, settings, device: torch.device, suffix: str = "before_ft") -> dict:
    """``acc_<suffix>`` etc. on the test split and ``val_acc_<suffix>`` on the validation split."""
    test, val = evaluate_test_val(model, dm, settings, device)
    tail = "" if suffix == "before_ft" else "_after_ft"
    return {f"acc_{suffix}": test["acc"], f"top5{tail}": test["top5"], f"loss{tail}": test["loss"],
            f"val_acc_{suffix}": val["acc"] if val else None, f"val_loss{tail}": val["loss"] if val else None}
