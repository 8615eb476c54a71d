"""The sweep: every score (and random draw) × every target, one shot each from the same trained network.

One point: group scores → allocation → FLOPs search on the analytic MAC count → physical pruning
(Torch-Pruning) → fvcore MACs of the pruned network → validation and test accuracy before (and
optionally after) a short fine-tune → latency → one JSON record (:mod:`.points` keys, stores and
reuses it).

fvcore's count and the latency depend on the pruned architecture only (every layer's width), not on
which channels went: both are measured once per distinct architecture in a process and reused for every
later point with the same widths (``uniform`` gives every score the same widths at a target; a multirun's
protocols and seeds run in one process). A point says whether its latency was reused (``latency_reused``).
"""

from __future__ import annotations

import copy
import json
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from axes_pipeline.models.graph import out_channels
from axes_pipeline.pruning.allocation import (
    CountSource,
    group_scores,
    keep_masks,
    make_allocation,
    match_flops,
    nominal_fraction,
    sensitivity_keys,
)
from axes_pipeline.pruning.evaluate import evaluate, evaluate_splits, finetune, held_batches, latency
from axes_pipeline.pruning.export import save_pruned
from axes_pipeline.pruning.flops import CostModel, count_params, fvcore_macs
from axes_pipeline.pruning.groups import GroupSet, prune_physically
from axes_pipeline.pruning.points import ScoreCache, point_label, read_point
from axes_pipeline.pruning.resolved import PruneSettings
from axes_pipeline.pruning.schedule import iterative_prune
from axes_pipeline.pruning.scores import SCORES, Score
from axes_pipeline.pruning.sensitivity import SCAN_FILE, cached_scan, check_scan_data, sensitivity_scan
from axes_pipeline.runs import plain, run_fingerprint, write_json

log = logging.getLogger("axes_pipeline")

__all__ = ["Sweep", "layer_widths", "one_point", "run_points"]

#: {architecture key: measurement}: fvcore's count and the latency of each distinct pruned architecture
#: measured in this process (bounded: the oldest go first)
_BY_ARCHITECTURE: dict[tuple, dict] = {}
_MAX_ARCHITECTURES = 4096


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
    counts: CountSource | None = None   # hybrid / sensitivity: where the per-layer counts come from, once
    _allocations: dict = field(default_factory=dict)   # (score, draw) -> its Allocation (knapsack's is costly)
    dead_said: bool = False             # the note on a run without dead channels, printed once
    layers: tuple[str, ...] = ()        # the analysable layers (names), whose widths name an architecture
    # iterative schedule: model -> the axes table re-measured on it (schedule.axes_remeasurer); None: no axes score
    remeasure_axes: Callable | None = None

    def group_scores(self, score: Score, draw: int) -> list[np.ndarray]:
        """The group scores of ``score`` (draw ``draw``), normalised by ``pruning.normalize``; with a
        hybrid or sensitivity allocation, the count source too (once, on first use)."""
        s, dead = self.settings, self.cache.ctx.dead()   # dead channels go first, whatever the score
        if dead is not None and not self.dead_said:
            self.dead_said = True
            n = sum(int(np.asarray(d).sum()) for d in dead.values())
            # a run with none is the usual case: say so, so that "dead channels first" is not read as tested here
            print(f"prune: note: {n} dead channel(s) on the calibration images, removed first by every score"
                  if n else "prune: note: no dead channels on the calibration images (the dead-first rule, "
                  "METHODS §9, removes none in this run)")
        gscores = group_scores(self.groups, self.cache.get(score, draw), s.depthwise_in_group_score, dead=dead,
                               how=s.normalize)
        if s.counts_source is not None and self.counts is None:
            self.counts = self._count_source(dead)
        return gscores

    def allocation(self, score: Score, draw: int):
        """The :class:`~axes_pipeline.pruning.allocation.Allocation` of ``score`` (draw ``draw``), built once for
        all of its targets."""
        key = (score.name, int(draw))
        if key not in self._allocations:
            s = self.settings
            self._allocations = {key: make_allocation(s.allocation, self.groups, self.group_scores(score, draw),
                                                      s.max_fraction, counts_from=self.counts, seed=s.seed,
                                                      cost=self.cost)}
        return self._allocations[key]

    def _count_source(self, dead) -> CountSource:
        s = self.settings
        src = s.counts_source
        if src == "uniform":
            return CountSource("uniform")
        if src == "sensitivity":
            return CountSource("sensitivity", sensitivity_keys(self.groups.sizes, s.sensitivity_fractions,
                                                               self._scan(dead)))
        return CountSource("score", group_scores(self.groups, self.cache.get(src, 0), s.depthwise_in_group_score,
                                                 dead=dead, how=s.normalize))

    def _scan(self, dead):
        """The sensitivity scan's drops ``[G, F]`` (:mod:`.sensitivity`), stored once per run and checkpoint."""
        s, cache = self.settings, self.cache
        check_scan_data(True, self.dm.split_sizes().get("val", 0))
        l1 = SCORES["l1"]   # Li et al. rank a layer's filters by their L1 norm
        key = plain(run_fingerprint(cache.data_id, cache.ckpt, stage="prune/sensitivity", input=list(cache.shape),
                                    fractions=s.sensitivity_fractions, ranking=l1.name,
                                    depthwise=s.depthwise_in_group_score, dead_first=s.calibration))
        ranking = group_scores(self.groups, cache.get(l1, 0), s.depthwise_in_group_score, dead=dead)
        val = held_batches(self.dm, ("val",), self.dm.split_sizes()["val"], self.dm.val_dataloader)

        def compute():
            print(f"prune: sensitivity scan: {len(self.groups)} layers x {len(s.sensitivity_fractions)} fractions "
                  "on the validation split")
            return sensitivity_scan(self.model, self.groups, ranking, s.sensitivity_fractions,
                                    lambda m: evaluate(m, val, self.device)["acc"])

        return cached_scan(cache.out / "scores" / SCAN_FILE, key, compute, self.groups, s.sensitivity_fractions)


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


def stored_records(sweep: Sweep, have: list[dict], resolve) -> tuple[list[dict], list[str]]:
    """The sound points of this protocol on disk that this run did not sweep (a score, or a random draw,
    left out of ``pruning.scores`` this time), each checked like a point of this run: the same key (the
    checkpoint, the protocol, the score's inputs) and a sound record. A protocol's curves are built from
    all of them with this run's: a run with fewer scores adds to its protocol, it never removes (issue 31).
    ``resolve``: score name → :class:`Score`. Returns (records, one note per score left out, and why)."""
    s, seen = sweep.settings, {(r["score"], r["draw"], r.get("target_flops") or r.get("target_channels")) for r in have}
    found, left_out = [], {}
    for path in sorted((sweep.out / "points").glob("*.json")):
        rec, why = _peek(path)
        if rec is None:
            left_out.setdefault(path.name, why)
            continue
        name, draw = rec["score"], rec["draw"]
        target = rec.get("target_flops") if s.mode == "flops" else rec.get("target_channels")
        if (name, draw, target) in seen or target not in s.targets:
            continue
        try:
            score = resolve(name)
        except Exception:  # noqa: BLE001 - a plugin's score not registered in this process: named, left out
            left_out.setdefault(name, "no such score is registered in this process")
            continue
        old, why = read_point(path, sweep.cache.point_key(score), score, draw, target, s, sweep.base)
        if old is None:
            left_out.setdefault(name, why or "made with other settings (another checkpoint, calibration or axes)")
            continue
        seen.add((name, draw, target))
        found.append(old)
    found.sort(key=lambda r: (r["score"], r["draw"], -(r.get("target_flops") or r.get("target_channels") or 0)))
    return found, [f"{k}: {v}" for k, v in left_out.items()]


def _peek(path: Path) -> tuple[dict | None, str]:
    """The score, draw and targets of a stored point, without checking its key yet."""
    try:
        rec = json.loads(path.read_text())
        if isinstance(rec, dict) and isinstance(rec.get("score"), str) and isinstance(rec.get("draw"), int):
            return rec, ""
    except (OSError, ValueError):
        pass
    return None, "cannot be read"


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
        t0 = time.perf_counter()
        alloc = sweep.allocation(score, draw)
        res = match_flops(alloc, cost, target, s.tolerance) if s.mode == "flops" else nominal_fraction(alloc, cost, target)
        keep = keep_masks(alloc, res.counts)
        t1 = time.perf_counter()
        pruned, history = prune_physically(sweep.model, sweep.groups, keep, example)
        t2 = time.perf_counter()
    widths = layer_widths(pruned, sweep.layers)
    # the widths name the architecture of one backbone; its unpruned MACs tell apart two backbones (another
    # classifier, input or width) that happen to share layer names and pruned widths
    arch = (type(sweep.model).__name__, tuple(example.shape), sweep.cost.total, tuple(sorted(widths.items())))
    fv, layer_macs = (_measured(("fvcore", arch), lambda: _fvcore(pruned, example, widths))
                      if s.fvcore_check else (None, None))
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
        # the pruned network's width and (fvcore) MACs of every analysable layer: layer_allocation.csv
        "layer_widths": widths, "layer_macs": layer_macs,
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
        rec.update(_latency(pruned, sweep, arch))
    if s.export:
        rec["export"] = str(_export(pruned, history, sweep, score, draw, target, rec["achieved_flops"]))
    return rec


def layer_widths(model: torch.nn.Module, layers) -> dict[str, int]:
    """``{layer: output channels}`` of ``model``'s analysable ``layers`` (names): what names its architecture."""
    mods = dict(model.named_modules())
    return {name: out_channels(mods[name]) for name in layers if name in mods}


def _measured(key: tuple, measure):
    """``measure()``, once per ``key`` in this process; a copy of the first result afterwards."""
    if key not in _BY_ARCHITECTURE:
        if len(_BY_ARCHITECTURE) >= _MAX_ARCHITECTURES:
            _BY_ARCHITECTURE.pop(next(iter(_BY_ARCHITECTURE)))
        _BY_ARCHITECTURE[key] = measure()
    return copy.deepcopy(_BY_ARCHITECTURE[key])


def _fvcore(pruned, example, widths: dict) -> tuple[int, dict[str, int]]:
    """fvcore's MACs of the pruned network, in total and per analysable layer."""
    total, _unsupported, per_module = fvcore_macs(pruned, example, by_module=True)
    return total, {name: int(sum(per_module.get(name, {}).values())) for name in widths}


def _latency(pruned, sweep: Sweep, arch: tuple) -> dict:
    """The pruned network's latencies, ``latency_ms`` (CPU, first batch size) and the speed-ups
    over the unpruned network; timed once per architecture (and batch sizes, repeats, threads)."""
    s = sweep.settings
    key = ("latency", arch, tuple(s.latency_batch_sizes), s.latency_repeats, torch.get_num_threads(),
           torch.cuda.is_available())
    reused = key in _BY_ARCHITECTURE
    lat = _measured(key, lambda: latency(pruned, tuple(sweep.example.shape), s.latency_batch_sizes,
                                         s.latency_repeats))
    rec = dict(lat, latency_ms=lat.get(f"latency_cpu_b{s.latency_batch_sizes[0]}_ms"), latency_reused=reused)
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
