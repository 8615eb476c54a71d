"""One point of the sweep on disk: its key, its JSON record, the unpruned reference, resume.

A point (a score, a draw, a target) is written atomically to ``<run_dir>/prune/points/`` and keyed
by :func:`axes_pipeline.runs.run_fingerprint` (data identity, checkpoint content, the settings that
matter, the analysis table's content). On a re-run a point whose key matches and whose record reads
back sound is reused, so an interrupted run resumes. The raw values of the calibration scores are
cached the same way under ``scores/``, keyed only by what they depend on.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from axes_pipeline.models.graph import out_channels
from axes_pipeline.pruning.evaluate import evaluate_test_val, latency
from axes_pipeline.pruning.flops import count_params
from axes_pipeline.pruning.resolved import PruneSettings
from axes_pipeline.pruning.scores import Score, ScoreContext
from axes_pipeline.runs import fingerprint, plain, read_record, run_fingerprint, write_record

log = logging.getLogger("axes_pipeline")

__all__ = ["POINT_VERSION", "ScoreCache", "point_label", "point_problems", "read_point", "unpruned"]

# 2: validation accuracies in every point, keys from runs.run_fingerprint
POINT_VERSION = 2


def point_label(score: Score, draw: int) -> str:
    return f"{score.name}-d{draw}" if score.stochastic else score.name


class ScoreCache:
    """Raw scores per (score, draw): in memory, and on disk for the calibration-based ones. It also
    keys scores and points, which depend on the same settings, checkpoint, input and analysis table."""

    def __init__(self, ctx: ScoreContext, out: Path, settings: PruneSettings, ckpt: Path, shape, axes: str | None,
                 data_id: dict):
        self.ctx, self.out, self.settings, self.ckpt, self.shape, self.axes = ctx, out, settings, ckpt, shape, axes
        self.data_id = data_id
        self.mem: dict[tuple[str, int], dict] = {}
        self.timing: dict[str, float] = {}

    def score_key(self, score: Score) -> dict:
        """What a score's raw values depend on: the data identity, the checkpoint's content and the
        score's own inputs; not the allocation, search or evaluation, so changing those never
        recomputes an expensive calibration score."""
        s = self.settings
        parts = {"stage": "prune/score", "v": POINT_VERSION, "score": score.name, "input": list(self.shape),
                 "magnitude": s.magnitude}
        if "calibration" in score.needs:
            parts["calibration"] = s.calibration
        if "axes" in score.needs:
            parts["axes"] = self.axes      # analyze.py rerun with other knobs -> other values
        return plain(run_fingerprint(self.data_id, self.ckpt, **parts))

    def point_key(self, score: Score) -> dict:
        """What a finished point depends on; a point with another key is recomputed."""
        s = self.settings
        parts = {
            "stage": "prune/point", "score": fingerprint(self.score_key(score)),
            "mode": s.mode, "allocation": s.allocation, "cap": s.max_fraction, "tol": s.tolerance,
            "depthwise": s.depthwise_in_group_score, "eval": [s.eval_samples, s.eval_seed],
            "finetune": s.finetune or False, "fvcore": s.fvcore_check,
            "latency": [s.latency_batch_sizes, s.latency_repeats] if s.latency else False,
            # dead channels first (ScoreContext.dead): the mask comes from the calibration images
            "dead_first": s.calibration,
        }
        if s.normalize != "minmax":   # the default's keys are those of the points written before the knob
            parts["normalize"] = s.normalize
        src = s.counts_source
        if isinstance(src, Score):
            parts["hybrid"] = fingerprint(self.score_key(src))
        elif src is not None:   # uniform counts, or the sensitivity scan's (its fractions and mask)
            parts["hybrid"] = src
            if src == "sensitivity":
                parts["sensitivity_fractions"] = s.sensitivity_fractions
        if s.schedule != "oneshot":   # (one-shot keys unchanged: their points are reused)
            parts["schedule"] = [s.schedule, s.steps, s.between_steps]
        return plain(run_fingerprint(self.data_id, self.ckpt, **parts))

    def get(self, score: Score, draw: int) -> dict[str, np.ndarray]:
        key, label = (score.name, draw), point_label(score, draw)
        if key in self.mem:
            return self.mem[key]
        path = self.out / "scores" / f"{label}.json"
        fp = self.score_key(score)
        stored = self._stored(path, fp) if "calibration" in score.needs else None
        if stored is not None:
            self.mem[key] = stored
            return stored
        t0 = time.perf_counter()
        values = score(self.ctx, draw)
        self.timing[label] = time.perf_counter() - t0
        if "calibration" in score.needs:
            write_record(path, {"score": score.name, "seconds": self.timing[label],
                                "values": {k: v.tolist() for k, v in values.items()}}, fp)
        if len(self.mem) > 8:
            self.mem.pop(next(iter(self.mem)))
        self.mem[key] = values
        return values

    def _stored(self, path: Path, fp: dict) -> dict[str, np.ndarray] | None:
        """The values cached at ``path`` when they carry key ``fp`` and are sound; else None."""
        saved, why = read_record(path, fp)
        if saved is None:
            if "cannot be read" in why or "not a record" in why:
                print(f"prune: note: score cache {path.name} cannot be read; recomputing it")
            return None
        try:
            values = {k: np.asarray(v, dtype=np.float64) for k, v in saved["values"].items()}
            layers = self.ctx.layers   # sound: one finite value per channel of every layer
            if set(values) == set(layers) and all(v.shape == (out_channels(layers[n]),) and np.isfinite(v).all()
                                                  for n, v in values.items()):
                return values
            print(f"prune: note: score cache {path.name} is damaged; recomputing it")
        except (ValueError, KeyError, TypeError, AttributeError):
            print(f"prune: note: score cache {path.name} cannot be read; recomputing it")
        return None


def read_point(path: Path, key: dict, score: Score, draw: int, target: float, settings: PruneSettings,
               base: dict) -> tuple[dict | None, str]:
    """A stored point when it is usable as is: ``(record, "")``; else ``(None, why)`` with ``why``
    empty when there is simply nothing (or a point of other settings) to reuse, and a one-line
    note when the file is damaged."""
    rec, why = read_record(path, key)
    if rec is None:
        if "cannot be read" in why or "not a record" in why:
            return None, f"point {why}"
        if why:   # a point of other settings: recomputed, said in the log
            log.info("prune: %s", why)
        return None, ""
    bad = point_problems(rec, score, draw, target, settings, n_val=int(base.get("n_val") or 0))
    return (None, f"point {path.name} is damaged ({bad})") if bad else (rec, "")


def point_problems(rec: dict, score: Score, draw: int, target: float, settings: PruneSettings, n_val: int) -> str:
    """What is wrong with a point record read back from disk ("" when it is sound)."""
    tcol = "target_flops" if settings.mode == "flops" else "target_channels"
    if rec.get("score") != score.name or rec.get("draw") != draw:
        return f"it holds {rec.get('score')!r} draw {rec.get('draw')!r}"
    if not isinstance(rec.get(tcol), (int, float)) or abs(float(rec[tcol]) - target) > 1e-12:
        return f"{tcol} is {rec.get(tcol)!r}, not {target:g}"
    accs = ["acc_before_ft"] + (["val_acc_before_ft"] if n_val else [])
    if settings.finetune:
        accs += ["acc_after_ft"] + (["val_acc_after_ft"] if n_val else [])
    for k in ["achieved_flops", "macs", *accs]:
        v = rec.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return f"{k} is {v!r}"
    for k in accs:
        if not 0.0 <= rec[k] <= 1.0:
            return f"{k} is {rec[k]!r}"
    if not 0.0 < rec["achieved_flops"] <= 1.0 + 1e-9:
        return f"achieved_flops is {rec['achieved_flops']!r}"
    return ""


def unpruned(model, dm, cost, example, settings: PruneSettings, device, out: Path, ckpt, data_id: dict) -> dict:
    """Accuracy (validation and test), MACs, params and latency of the unpruned network
    (cached next to the points, keyed like them)."""
    path = out / "unpruned.json"
    key = plain(run_fingerprint(data_id, ckpt, stage="prune/unpruned", v=POINT_VERSION,
                                eval=[settings.eval_samples, settings.eval_seed],
                                latency=settings.latency and settings.latency_batch_sizes))
    old, why = read_record(path, key)
    if old is not None and isinstance(old.get("acc"), float) and math.isfinite(old["acc"]) and "val_acc" in old:
        return old
    if "cannot be read" in why or "not a record" in why:
        print(f"prune: note: {path.name} cannot be read; recomputing it")
    acc, val = evaluate_test_val(model, dm, settings, device)
    val = val or {"acc": None, "loss": None, "n": 0}
    base = {"acc": acc["acc"], "top5": acc["top5"], "loss": acc["loss"], "n_eval": acc["n"],
            "val_acc": val["acc"], "val_loss": val["loss"], "n_val": val["n"],
            "macs": cost.total, "params": count_params(model), "unsupported_ops": cost.unsupported,
            "unattributed_macs": {f"{m}:{o}": v for (m, o), v in cost.unattributed.items()}}
    if settings.latency:
        base.update(latency(model, tuple(example.shape), settings.latency_batch_sizes, settings.latency_repeats))
    write_record(path, base, key)
    return {**base, "fingerprint": key}
