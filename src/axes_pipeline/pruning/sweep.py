"""The sweep: every score (and random draw) × every target, one shot each from the same trained network.

One point: group scores → allocation → FLOPs search on the analytic MAC count → physical pruning
(Torch-Pruning) → fvcore MACs of the pruned network → validation and test accuracy before (and
optionally after) a short fine-tune → latency → one JSON record (:mod:`.points` keys, stores and
reuses it).
"""

from __future__ import annotations

import copy
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from axes_pipeline.pruning.allocation import group_scores, keep_masks, make_allocation, match_flops, nominal_fraction
from axes_pipeline.pruning.evaluate import evaluate_splits, finetune, latency
from axes_pipeline.pruning.export import save_pruned
from axes_pipeline.pruning.flops import CostModel, count_params, fvcore_macs
from axes_pipeline.pruning.groups import GroupSet, prune_physically
from axes_pipeline.pruning.points import ScoreCache, point_label, read_point
from axes_pipeline.pruning.resolved import PruneSettings
from axes_pipeline.pruning.schedule import iterative_prune
from axes_pipeline.pruning.scores import Score
from axes_pipeline.runs import write_json

log = logging.getLogger("axes_pipeline")

__all__ = ["Sweep", "one_point", "run_points"]


@dataclass
class Sweep:
    """What every point of one prune run shares: the settings, the unpruned network and its
    coupled groups and cost model, the data, where points go, the unpruned reference (``base``)
    and the raw-score cache (which also keys the points)."""

    settings: PruneSettings
    model: torch.nn.Module
    groups: GroupSet
    cost: CostModel
    example: torch.Tensor
    dm: object
    device: torch.device
    out: Path
    base: dict
    cache: ScoreCache
    model_spec: dict | None = None      # the backbone's build arguments (export.model_spec), for exported networks
    hybrid_counts: list | None = None   # hybrid allocation: group scores of the count source, once
    # iterative schedule: model -> the axes table re-measured on it (schedule.axes_remeasurer); None: no axes score
    remeasure_axes: Callable | None = None

    def group_scores(self, score: Score, draw: int) -> list[np.ndarray]:
        """The group scores of ``score`` (draw ``draw``); with the hybrid allocation, the count
        source's group scores too (once, on first use)."""
        s, dead = self.settings, self.cache.ctx.dead()   # dead channels go first, whatever the score
        gscores = group_scores(self.groups, self.cache.get(score, draw), s.depthwise_in_group_score, dead=dead)
        if s.allocation == "hybrid" and self.hybrid_counts is None:
            self.hybrid_counts = group_scores(self.groups, self.cache.get(s.hybrid_counts_from, 0),
                                              s.depthwise_in_group_score, dead=dead)
        return gscores


def run_points(sweep: Sweep, progress) -> tuple[list[dict], int]:
    """Every point of the sweep, in order: reused when stored with the same key and sound, else
    computed and written. Returns (records, how many were computed)."""
    s, out = sweep.settings, sweep.out
    records: list[dict] = []
    done = 0
    for score, draw, target in progress(s.points(), "prune", enabled=s.progress,
                                        label=lambda p: f"{point_label(p[0], p[1])} @ {p[2]:g}"):
        label = point_label(score, draw)
        path = out / "points" / f"{label}__{target:g}.json"
        key = sweep.cache.point_key(score)
        model_ok = not s.export or (out / "models" / f"{label}_{target:g}.pt").is_file()
        old, why = read_point(path, key, score, draw, target, s, sweep.base)
        if old is not None and model_ok:
            records.append(old)
            continue
        if why:
            print(f"prune: note: {why}; recomputing it")
        record = one_point(sweep, score, draw, target)
        record["fingerprint"] = key
        write_json(path, record)
        records.append(record)
        done += 1
    return records, done


def one_point(sweep: Sweep, score: Score, draw: int, target: float) -> dict:
    """Prune the unpruned network to ``target`` by the group scores of ``score`` (draw ``draw``),
    measure it and return its record."""
    s, cost, dm, device, example = sweep.settings, sweep.cost, sweep.dm, sweep.device, sweep.example
    if s.schedule == "iterative":   # k re-scored FLOPs-matched steps (schedule.py); the same record follows
        t0 = time.perf_counter()
        it = iterative_prune(sweep, score, draw, target, point_label(score, draw))
        pruned, history, res, keep = it.pruned, it.history, it.result, it.keep
        t1 = t2 = time.perf_counter()
    else:
        gscores = sweep.group_scores(score, draw)
        t0 = time.perf_counter()
        alloc = make_allocation(s.allocation, sweep.groups, gscores, s.max_fraction, counts_from=sweep.hybrid_counts,
                                seed=s.seed)
        res = (match_flops(alloc, cost, target, s.tolerance) if s.mode == "flops"
               else nominal_fraction(alloc, cost, target))
        keep = keep_masks(alloc, res.counts)
        t1 = time.perf_counter()
        pruned, history = prune_physically(sweep.model, sweep.groups, keep, example)
        t2 = time.perf_counter()
    fv, _unsupported = (fvcore_macs(pruned, example) if s.fvcore_check else (None, {}))
    macs = fv if fv is not None else res.macs
    t3 = time.perf_counter()
    acc = evaluate_splits(pruned, dm, s, device)
    t4 = time.perf_counter()
    kept_channels = float(sum(int(k.sum()) for k in keep)) / float(sum(k.size for k in keep))
    rec = {
        "score": score.name, "axis": score.axis, "draw": int(draw), "family": score.family,
        "param": score.param, "mode": s.mode, "allocation": s.allocation,
        "target_flops": target if s.mode == "flops" else None,
        "target_channels": target if s.mode == "channel_fraction" else None,
        "achieved_flops": macs / cost.total, "achieved_flops_analytic": res.macs / cost.total,
        # matched is judged on the count reported as achieved_flops (fvcore's when it checks)
        "macs": int(macs), "macs_analytic": int(res.macs),
        "matched": bool(abs(macs / cost.total - target) <= s.tolerance) if s.mode == "flops" else None,
        "refined": bool(res.refined), "channels_frac": kept_channels,
        "params_frac": count_params(pruned) / sweep.base["params"],
        **acc,
        "group_kept": {g.name: int(k.sum()) for g, k in zip(sweep.groups.groups, keep)},
        "search_s": t1 - t0, "search_evals": res.evaluations, "prune_s": t2 - t1, "fvcore_s": t3 - t2,
        "eval_s": t4 - t3, "schedule": s.schedule, "steps": s.steps,
    }
    if s.mode == "flops" and not rec["matched"]:
        # the value the decision was made on (fvcore's count when it checks), not the search's analytic one
        log.warning("%s: target %.3f not matched within %.3f (achieved %.4f, %s count)", point_label(score, draw),
                    target, s.tolerance, rec["achieved_flops"], "fvcore" if fv is not None else "analytic")
    if fv is not None and fv != res.macs:
        log.warning("%s @ %g: analytic MACs %d != fvcore %d", point_label(score, draw), target, res.macs, fv)
    if s.finetune:
        t5 = time.perf_counter()
        tuned = copy.deepcopy(pruned)
        # the shuffle, augmentation and loader workers draw from the global RNG: seeded per point, so a
        # point's fine-tune repeats whatever ran before it in this process (a resumed sweep included)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(zlib.crc32(f"{s.seed}|{point_label(score, draw)}|{target!r}".encode()))
            ft = finetune(tuned, dm.train_dataloader(), device, **s.finetune)   # pruning.finetune but `enabled`
        rec.update(evaluate_splits(tuned, dm, s, device, "after_ft"))
        rec.update({"finetune_steps": ft["steps"], "finetune_loss": ft["loss"], "finetune_s": time.perf_counter() - t5})
        if s.export:
            pruned = tuned
    else:   # budget 0: nothing recovered, after = before, so every point has both and budgets pair on one column
        rec.update({"acc_after_ft": rec["acc_before_ft"], "val_acc_after_ft": rec["val_acc_before_ft"],
                    "top5_after_ft": rec["top5"], "loss_after_ft": rec["loss"], "val_loss_after_ft": rec["val_loss"]})
    rec["finetune_epochs"] = s.finetune["epochs"] if s.finetune else 0   # the recovery budget
    if s.latency:
        rec.update(_latency(pruned, sweep))
    if s.export:
        rec["export"] = str(_export(pruned, history, sweep, score, draw, target, rec["achieved_flops"]))
    return rec


def _latency(pruned, sweep: Sweep) -> dict:
    """The pruned network's latencies, ``latency_ms`` (CPU, first batch size) and the speed-ups
    over the unpruned network."""
    s = sweep.settings
    lat = latency(pruned, tuple(sweep.example.shape), s.latency_batch_sizes, s.latency_repeats)
    rec = dict(lat, latency_ms=lat.get(f"latency_cpu_b{s.latency_batch_sizes[0]}_ms"))
    for k, v in lat.items():
        if sweep.base.get(k):
            rec[k.replace("latency_", "speedup_").replace("_ms", "")] = sweep.base[k] / v
    return rec


def _export(pruned, history, sweep: Sweep, score: Score, draw: int, target: float, achieved: float) -> Path:
    s = sweep.settings
    path = sweep.out / "models" / f"{point_label(score, draw)}_{target:g}.pt"
    save_pruned(path, sweep.model_spec, sweep.example.shape, history, pruned,
                meta={"score": score.name, "draw": int(draw), "target": target, "achieved_flops": achieved,
                      "finetuned": bool(s.finetune)})
    return path
