"""Scratch training (METHODS §9): the pruned architecture of chosen points trained from random
initialisation with the run's training recipe (``acc_scratch`` beside ``acc_after_ft``).

Liu et al. (ICLR 2019) found that training a pruned architecture from scratch often matches
fine-tuning its pruned weights; then a criterion's value lies in the per-layer widths it picks, not in
the weights it keeps. The points: the best local and the best target score (chosen on validation, as
the summary chooses them) and ``random`` (draw 0), each at the sweep's targets nearest
``pruning.scratch_targets`` (0.7, 0.5, 0.3 of the unpruned MACs by default).

The network: the backbone built afresh (its own initialisation, seeded by the run's seed and the
point) and cut physically to the point's widths (the first channels of every group: the weights are
i.i.d. at initialisation, so which ones does not matter); nothing of the trained or pruned weights is
read. It is trained as train.py trains (the LightningModule, its optimizer, warm-up and cosine
schedule, label smoothing, the per-epoch seeding that makes a resume the run it resumes) for the
run's epochs or ``pruning.scratch_epochs``, on a GPU when one is visible, with its checkpoints in
``prune/scratch/<score>_<target>/checkpoints/`` (``last.ckpt`` the resume point, ``best.ckpt`` the
best validation epoch, which is the one evaluated). ``scratch.json`` (atomic, keyed) marks it done.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from axes_pipeline.models import build_model
from axes_pipeline.pruning.evaluate import evaluate_test_val
from axes_pipeline.pruning.groups import GroupSet, prune_physically
from axes_pipeline.pruning.points import point_label
from axes_pipeline.pruning.scores import resolve_score
from axes_pipeline.runs import fingerprint, plain, read_record, write_record
from axes_pipeline.training.callbacks import EpochLines
from axes_pipeline.training.module import ClassifierModule
from axes_pipeline.training.optim import optimizer_factory
from axes_pipeline.training.train import EpochRNG, resume_point

__all__ = ["ScratchRecipe", "scratch_net", "scratch_points", "train_scratch", "train_scratch_points"]


@dataclass
class ScratchRecipe:
    """The run's training recipe as train.py reads it (built by the stage body from ``cfg``)."""

    optim: dict                       # cfg.optim, resolved (optimizer_factory)
    epochs: int                       # pruning.scratch_epochs, else trainer.max_epochs
    label_smoothing: float = 0.0
    warmup_epochs: int = 0
    precision: str = "32-true"        # the run's; 32-true on a CPU
    limit_train_batches: Any = None
    limit_val_batches: Any = None

    @property
    def accelerator(self) -> str:
        return "gpu" if torch.cuda.is_available() else "cpu"


def _nearest(targets: list[float], want: float) -> float:
    return min(targets, key=lambda t: (round(abs(t - want), 9), -t))   # a tie: the milder cut


def scratch_points(summary: dict, targets: list[float], scratch_targets: list[float]) -> list[tuple[str, int, float]]:
    """``(score, draw, target)`` of the points trained from scratch: the best local and best target score
    (``summary["best_local"]`` / ``["best_target"]``, chosen on validation) and random draw 0, each at the
    sweep target nearest each of ``scratch_targets``. A score the summary did not choose (no validation
    split, no score of that axis) is left out; random only when it is in the sweep."""
    names = [b["score"] for b in (summary.get("best_local"), summary.get("best_target")) if b]
    if "random" in summary.get("scores", {}):
        names.append("random")
    chosen = sorted({_nearest(targets, t) for t in scratch_targets}, reverse=True)
    return [(name, 0, t) for name in dict.fromkeys(names) for t in chosen]


def scratch_net(spec: dict, groups: GroupSet, widths: dict[str, int], example: torch.Tensor, seed: int) -> nn.Module:
    """The backbone of ``spec`` (:func:`~axes_pipeline.pruning.export.model_spec`) freshly initialised under
    ``seed`` and cut to ``widths`` (``{group: channels kept}``, a point's ``group_kept``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        fresh = build_model(spec["name"], spec["num_classes"], width=spec["width"], **spec["knobs"])
    keep = []
    for g in groups.groups:
        k = np.zeros(g.size, dtype=bool)
        k[: int(widths[g.name])] = True
        keep.append(k)
    net, _history = prune_physically(fresh.to(example.device), groups, keep, example)
    return net


def train_scratch(net: nn.Module, dm, recipe: ScratchRecipe, folder: Path, seed: int) -> dict:
    """Train ``net`` (in place) with ``recipe`` in ``folder`` (resuming from ``checkpoints/last.ckpt``),
    load the best validation epoch's weights (the last epoch's without a validation split) and return
    how it went: epochs, seconds, the device."""
    has_val = dm.split_sizes().get("val", 0) > 0
    module = ClassifierModule(net, optimizer=optimizer_factory(OmegaConf.create(recipe.optim)),
                              num_classes=dm.num_classes, label_smoothing=recipe.label_smoothing,
                              warmup_epochs=recipe.warmup_epochs, meta={"scratch": True, "seed": int(seed)})
    ckpts = folder / "checkpoints"
    resume, first_epoch, _step = resume_point(folder)
    checkpoint = (ModelCheckpoint(dirpath=ckpts, filename="best", monitor="val/acc", mode="max", save_last=True)
                  if has_val else ModelCheckpoint(dirpath=ckpts, save_last=True, save_top_k=0))
    gpu = recipe.accelerator == "gpu"
    # the run's precision on a GPU (ddp's `auto` is bf16 there, as ddp_trainer resolves it); a CPU trains in fp32
    precision = ("bf16-mixed" if recipe.precision == "auto" else recipe.precision) if gpu else "32-true"
    trainer = L.Trainer(accelerator=recipe.accelerator, devices=1, max_epochs=int(recipe.epochs),
                        precision=precision, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(folder),
                        limit_train_batches=recipe.limit_train_batches, limit_val_batches=recipe.limit_val_batches,
                        callbacks=[EpochRNG(seed, first_epoch), checkpoint, EpochLines()])
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume is not None else None)
    if trainer.interrupted:
        raise KeyboardInterrupt
    seconds = time.perf_counter() - t0
    chosen = ckpts / ("best.ckpt" if has_val else "last.ckpt")
    state = torch.load(chosen, map_location="cpu", weights_only=True)["state_dict"]
    net.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return {"epochs": int(recipe.epochs), "epochs_this_run": int(recipe.epochs) - first_epoch, "seconds": seconds,
            "seconds_per_epoch": seconds / max(1, int(recipe.epochs) - first_epoch), "device": recipe.accelerator,
            "checkpoint": str(chosen)}


def train_scratch_points(sweep, records: list[dict], summary: dict, recipe: ScratchRecipe) -> dict:
    """Train the :func:`scratch_points` of this sweep from scratch (or read them back when done) and write
    ``acc_scratch`` / ``val_acc_scratch`` into their ``records`` (in place). Returns the summary's
    ``scratch`` block. ``sweep``: the :class:`~axes_pipeline.pruning.sweep.Sweep`."""
    s = sweep.settings
    device = torch.device("cuda" if recipe.accelerator == "gpu" else "cpu")
    by_point = {(r["score"], int(r["draw"]), float(r["target_flops"])): r for r in records}
    done = []
    for name, draw, target in scratch_points(summary, s.targets, s.scratch_targets):
        rec = by_point.get((name, draw, target))
        if rec is None:
            continue
        score = resolve_score(name)
        label = point_label(score, draw)
        folder = sweep.out / "scratch" / f"{label}_{target:g}"
        # the point's key (checkpoint, data, score, settings) and the recipe: either changed, trained again
        key = plain({"point": fingerprint(sweep.cache.point_key(score)), "recipe": asdict(recipe),
                     "v": 1})
        out, _why = read_record(folder / "scratch.json", key)
        if out is None:
            seed = zlib.crc32(f"{s.seed}|scratch|{label}|{target!r}".encode())
            print(f"prune: scratch {label} @ {target:g}: {recipe.epochs} epochs on {recipe.accelerator} -> {folder}")
            net = scratch_net(sweep.model_spec, sweep.groups, rec["group_kept"], sweep.example.cpu(), seed)
            ran = train_scratch(net, sweep.dm, recipe, folder, seed)
            test, val = evaluate_test_val(net.to(device), sweep.dm, s, device)
            out = {"score": name, "draw": draw, "target": target, "widths": rec["group_kept"], **ran,
                   "acc_scratch": test["acc"], "val_acc_scratch": val["acc"] if val else None}
            write_record(folder / "scratch.json", out, key)
        rec.update(acc_scratch=out["acc_scratch"], val_acc_scratch=out["val_acc_scratch"])
        after = rec.get("acc_after_ft")   # (a point written before budgets were recorded may lack it)
        print(f"prune: scratch {label} @ {target:g}: acc_scratch={out['acc_scratch']:.4f} (pruned: before "
              f"fine-tune {rec['acc_before_ft']:.4f}" + (f", after {after:.4f})" if after is not None else ")"))
        done.append({k: out[k] for k in ("score", "draw", "target", "acc_scratch", "val_acc_scratch", "epochs",
                                         "seconds_per_epoch", "device")})
    return {"points": done, "epochs": int(recipe.epochs)}
