"""The iterative schedule (METHODS §9): a target reached in ``k`` FLOPs-matched steps, the scores
measured again on the pruned network before each step after the first.

Step ``i`` of ``k`` keeps ``target^(i/k)`` of the unpruned MACs (geometric: every step removes the
same fraction of what is left, so no step is a larger cut than the others). Before step ``i > 1``:

- the axes are re-captured on the physically pruned network with the run's capture settings and the
  same calibration images (:func:`axes_remeasurer`; the community graphs and gradient cosines,
  which no score reads, are left out), Taylor / HRank / CHIP and the dead-channel mask recomputed on
  it, the weight scores re-read from its weights (a fresh :class:`ScoreContext` on the pruned model);
- its coupled groups and cost model are rebuilt, and the step's allocation is FLOPs-matched
  against the unpruned network's MACs (the window ``±tolerance`` of the unpruned MACs, as a one-shot
  point's), with each group's cap that of its unpruned width (a layer never loses more than
  ``max_fraction`` of its unpruned channels, however many steps).

Step 1 uses the one-shot scores of the unpruned network, so its cut is the one-shot cut to
``target^(1/k)``. With ``pruning.finetune.between_steps`` the pruned network is fine-tuned (the
point's budget, seeded per step) after every step but the last. Each step is written atomically to
``prune/steps/<score>__<target>/step<i>.json`` (widths, the pruning history, the original indices of
the kept channels, the raw scores, the achieved MACs) under the point's key; a killed run replays the
stored steps (the history on the unpruned network; with a fine-tune between steps, the weights of the
last stored step from ``step<i>.pt``) and goes on from the first missing one, to the same result.
"""

from __future__ import annotations

import copy
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from axes_pipeline.axes.settings import AxesKnobs
from axes_pipeline.axes.table import AXES_SCHEMA, analyze_capture, calibration_loader, depth_index, fit_capture_size, select_units
from axes_pipeline.capture import capture_activations, check_finite
from axes_pipeline.models import conv_layers
from axes_pipeline.pruning.allocation import (
    CountSource,
    SearchResult,
    _caps,
    group_scores,
    keep_masks,
    make_allocation,
    match_flops,
)
from axes_pipeline.pruning.evaluate import finetune
from axes_pipeline.pruning.flops import CostModel
from axes_pipeline.pruning.groups import GroupSet, build_groups, prune_physically, redo_pruning
from axes_pipeline.pruning.scores import Score
from axes_pipeline.runs import atomic_path, read_record, write_record

__all__ = ["IterativeResult", "axes_remeasurer", "iterative_prune", "step_caps", "step_targets"]


def step_targets(target: float, steps: int) -> list[float]:
    """The MACs kept after each of ``steps`` steps, fractions of the unpruned MACs: ``target^(i/steps)``
    (the last one exactly ``target``)."""
    k = int(steps)
    return [float(target) ** (i / k) for i in range(1, k)] + [float(target)]


def step_caps(unpruned: np.ndarray, current: np.ndarray, cap: float) -> np.ndarray:
    """``[G]``: how many more channels each group may lose so that at most ``cap`` of its ``unpruned``
    width goes in all steps together (and one channel stays)."""
    removed = np.asarray(unpruned, dtype=np.int64) - np.asarray(current, dtype=np.int64)
    return np.maximum(_caps(np.asarray(unpruned, dtype=np.int64), cap) - removed, 0)


def axes_remeasurer(knobs: AxesKnobs, dm, device: torch.device) -> Callable[[nn.Module], pd.DataFrame]:
    """``model -> axes table``: the two axes captured on ``model`` (a pruned network) with the run's
    capture and metric knobs and the same calibration images as the analysis of the unpruned one.
    Nothing is cached: the table belongs to one step of one point (its step record keeps the scores)."""
    knobs = fit_capture_size(knobs, dm)
    # no score reads the community graphs or the gradient cosines: not computed on a pruned network
    knobs = replace(knobs, graphs=replace(knobs.graphs, edge_fraction=0.0),
                    gradients=replace(knobs.gradients, enabled=False))
    c = knobs.capture

    def remeasure(model: nn.Module) -> pd.DataFrame:
        units = select_units(model, c.layers)
        capture = capture_activations(model, units, calibration_loader(c, dm), point=c.point, spatial=c.spatial,
                                      samples_per_image=int(c.samples_per_image), target=c.target, seed=int(c.seed),
                                      device=device, progress=False, keep_samples=False)
        check_finite(capture)
        axes_df, _layers, _results = analyze_capture(capture, units, knobs, device, progress=False,
                                                     index=depth_index(model))
        cols = [k for k in AXES_SCHEMA.finite if k in axes_df]
        bad = ~np.isfinite(axes_df[cols].to_numpy(dtype=np.float64))
        if bad.any():   # a NaN would become the lowest keep value and silently move the step's cut
            raise RuntimeError(f"the axes re-measured on a pruned network are not finite ({int(bad.sum())} values)")
        return axes_df

    return remeasure


@dataclass
class IterativeResult:
    """The point's network after its last step, what one_point records as for a one-shot cut."""

    pruned: nn.Module
    history: list              # Torch-Pruning's history of every step, in order (export replays it)
    result: SearchResult       # the last step's search (its analytic MACs, refined)
    keep: list[np.ndarray]     # over the UNPRUNED groups: which of their channels are left
    steps: list[dict]          # the step records


def _replay(sweep, history: list, state: Path | None) -> nn.Module:
    """The unpruned network with ``history`` applied (the weights it keeps), or ``state``'s weights."""
    model = redo_pruning(copy.deepcopy(sweep.model), history, sweep.example)
    if state is not None:
        model.load_state_dict(torch.load(state, map_location=sweep.device, weights_only=True))
    return model.eval()


def _step_ok(rec: dict | None, i: int, t: float, groups: GroupSet) -> bool:
    return (rec is not None and rec.get("step") == i and abs(float(rec.get("target", -1)) - t) <= 1e-12
            and set(rec.get("kept_channels", {})) == {g.name for g in groups.groups})


def iterative_prune(sweep, score: Score, draw: int, target: float, label: str) -> IterativeResult:
    """Reach ``target`` in ``settings.steps`` re-scored steps (module docstring). ``sweep``: the
    :class:`~axes_pipeline.pruning.sweep.Sweep` (its unpruned network, groups, cost model, score cache and
    ``remeasure_axes``)."""
    s = sweep.settings
    folder = sweep.out / "steps" / f"{label}__{target:g}"
    key = sweep.cache.point_key(score)          # a step of other settings is recomputed
    total = int(sweep.cost.total)               # every step is matched against the unpruned MACs
    unpruned_sizes = {g.name: g.size for g in sweep.groups.groups}
    targets = step_targets(target, s.steps)

    stored: list[dict] = []
    for i, t in enumerate(targets, start=1):
        rec, _why = read_record(folder / f"step{i}.json", key)
        state = folder / f"step{i}.pt"
        if not _step_ok(rec, i, t, sweep.groups) or (s.between_steps and not state.is_file()):
            break
        stored.append(rec)
    history = [h for rec in stored for h in rec["history"]]
    kept = {g: np.arange(n) for g, n in unpruned_sizes.items()}    # unpruned channel index of each one left
    model, groups, cost = sweep.model, sweep.groups, sweep.cost
    if stored:
        model = _replay(sweep, history, folder / f"step{len(stored)}.pt" if s.between_steps else None)
        kept = {g: np.asarray(v, dtype=np.int64) for g, v in stored[-1]["kept_channels"].items()}
    steps = list(stored)
    res = None
    for i in range(len(stored) + 1, len(targets) + 1):
        t0, t = time.perf_counter(), targets[i - 1]
        if i > 1:
            groups = build_groups(model, sweep.example)
            cost = CostModel.build(model, groups, sweep.example)
        values, gscores, counts_from = _step_scores(sweep, score, draw, model, groups, i)
        sizes_now = groups.sizes
        caps = step_caps(np.array([unpruned_sizes[g.name] for g in groups.groups]), sizes_now, s.max_fraction)
        alloc = make_allocation(s.allocation, groups, gscores, s.max_fraction, counts_from=counts_from, seed=s.seed,
                                cost=cost, caps=caps)
        now = int(cost.macs_counts(sizes_now))
        res = match_flops(alloc, cost, t * total / now, s.tolerance * total / now)
        keep = keep_masks(alloc, res.counts)
        model, h = prune_physically(model, groups, keep, sweep.example)
        model.eval()
        history += h
        kept = {g.name: kept[g.name][k] for g, k in zip(groups.groups, keep)}
        rec = {"step": i, "steps": len(targets), "target": t, "macs": int(res.macs), "achieved_flops": res.macs / total,
               "matched": bool(abs(res.macs / total - t) <= s.tolerance), "refined": bool(res.refined),
               "search_evals": res.evaluations, "param": int(res.param),
               "widths": {g: int(v.size) for g, v in kept.items()},
               "rescored": i > 1, "axes_remeasured": i > 1 and "axes" in score.needs,
               "history": h, "kept_channels": {g: v.tolist() for g, v in kept.items()},
               "scores": {layer: np.asarray(v, dtype=np.float64).tolist() for layer, v in values.items()}}
        if s.between_steps and i < len(targets):
            with torch.random.fork_rng(devices=[sweep.device] if sweep.device.type == "cuda" else []):
                torch.manual_seed(zlib.crc32(f"{s.seed}|{label}|{target!r}|step{i}".encode()))
                ft = finetune(model, sweep.dm.train_dataloader(), sweep.device, **s.finetune)
            model.eval()
            rec.update(finetune_steps=ft["steps"], finetune_loss=ft["loss"])
        if s.between_steps:   # the weights after the step (and its fine-tune): the next step's, or the point's
            with atomic_path(folder / f"step{i}.pt") as tmp:   # (a replayed history has the unpruned ones)
                torch.save(model.state_dict(), tmp)
        rec["seconds"] = time.perf_counter() - t0
        write_record(folder / f"step{i}.json", rec, key)
        steps.append(rec)
    if res is None:   # every step was stored: the last one's search, as recorded
        last = steps[-1]
        res = SearchResult(np.zeros(0, dtype=np.int64), int(last["macs"]), last["achieved_flops"], last["matched"],
                           int(last.get("param", -1)), int(last["search_evals"]), bool(last["refined"]))
    keep_unpruned = []
    for g in sweep.groups.groups:
        mask = np.zeros(g.size, dtype=bool)
        mask[kept[g.name]] = True
        keep_unpruned.append(mask)
    return IterativeResult(model, history, res, keep_unpruned, steps)


def _step_scores(sweep, score: Score, draw: int, model: nn.Module, groups: GroupSet, i: int):
    """``(raw values, group scores, hybrid counts' group scores)`` of step ``i``: step 1 the one-shot
    scores of the unpruned network, later steps measured again on ``model``."""
    s = sweep.settings
    if i == 1:
        gscores = sweep.group_scores(score, draw)
        return sweep.cache.get(score, draw), gscores, sweep.counts
    remeasure = sweep.remeasure_axes
    # random: another seeded draw per step (the run's seed and the step), as a fresh score would be
    ctx = replace(sweep.cache.ctx, model=model, layers=conv_layers(model), _cache={},
                  axes_loader=(lambda: remeasure(model)) if remeasure is not None else None,
                  seed=zlib.crc32(f"{sweep.cache.ctx.seed}|step{i}".encode()))
    values = score(ctx, draw)
    dead = ctx.dead()
    gscores = group_scores(groups, values, s.depthwise_in_group_score, dead=dead, how=s.normalize)
    src, counts_from = s.counts_source, None
    if src == "uniform":
        counts_from = CountSource("uniform")
    elif src is not None:   # a score's counts, measured again on the pruned network like the ranking
        counts_from = CountSource("score", group_scores(groups, src(ctx, 0), s.depthwise_in_group_score, dead=dead,
                                                        how=s.normalize))
    return values, gscores, counts_from
