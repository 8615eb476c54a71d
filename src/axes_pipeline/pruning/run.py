"""run_prune(cfg): the body of prune.py (METHODS §9).

For every score (and random draw) and every target, one shot from the same trained checkpoint:
scores → group scores → allocation → FLOPs search on the analytic MAC count → physical pruning
(Torch-Pruning) → fvcore MACs of the pruned network → validation and test accuracy before (and
optionally after) a short fine-tune → latency → one JSON point. Points are written atomically
under ``<run_dir>/prune/points/``, keyed by :func:`axes_pipeline.runs.run_fingerprint` (data
identity, checkpoint content, the settings that matter, the analysis table's content) and
skipped on re-run when their key matches and the record reads back sound, so an interrupted run
resumes; ``prune_curves.csv`` and ``prune_summary.json`` are rebuilt from the points in memory
every time and replaced together.

Selection and measurement (METHODS §9): every "best" (best local / target score, the best α / β
of a sweep) is chosen on the validation split's FLOPs-AUC; the test FLOPs-AUC of the chosen score
is what is reported. Every FLOPs-AUC is taken over one removed-FLOPs grid shared by all scores
(:func:`axes_pipeline.stats.grid_aucs`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from axes_pipeline.config import to_container
from axes_pipeline.errors import UserError, unknown_name
from axes_pipeline.pruning.allocation import (
    ALLOCATIONS,
    group_scores,
    keep_masks,
    make_allocation,
    match_flops,
    nominal_fraction,
)
from axes_pipeline.pruning.evaluate import evaluate, finetune, latency, resolve_device
from axes_pipeline.pruning.flops import CostModel, count_params, fvcore_macs
from axes_pipeline.pruning.groups import build_groups, prune_physically
from axes_pipeline.pruning.scores import (
    AXES,
    DEFAULT_MAGNITUDE,
    DEFAULT_SCORES,
    FAMILIES,
    Score,
    ScoreContext,
    resolve_score,
)
from axes_pipeline.runs import (atomic_path, fingerprint, read_json, run_fingerprint, settings_diff, write_csv,
                                 write_json)
from axes_pipeline.stats import grid_aucs
from axes_pipeline.tables import Schema, check_table, read_table

log = logging.getLogger("axes_pipeline")

__all__ = ["PruneSettings", "axes_schema", "point_label", "run_prune"]

MODES = ("flops", "channel_fraction")
# 2: validation accuracies in every point, keys from runs.run_fingerprint
POINT_VERSION = 2
#: the split every "best" is chosen on, and the one its reported accuracy is measured on
SELECTION_SPLIT, MEASUREMENT_SPLIT = "val", "test"


# --------------------------------------------------------------------------------------------
# Settings (validated before anything expensive)
# --------------------------------------------------------------------------------------------


class PruneSettings:
    """The validated ``cfg.pruning`` block (plus the resolved allocation)."""

    def __init__(self, cfg: DictConfig):
        pc = cfg.pruning
        self.cfg = cfg
        names = pc.get("scores")
        if names is None or (isinstance(names, str) and names == "all"):
            names = list(DEFAULT_SCORES)
        elif isinstance(names, str):
            names = [names]
        names = [str(n) for n in names]
        if not names:
            raise UserError("pruning.scores is empty; give at least one score name")
        self.scores: list[Score] = []
        for n in dict.fromkeys(names):
            score = resolve_score(n)
            if score.name not in {s.name for s in self.scores}:   # b0.3 and b0.30 are one score
                self.scores.append(score)
        targets = pc.get("targets")
        if targets is None or len(targets) == 0:
            raise UserError("pruning.targets is empty; give fractions in (0, 1], e.g. [0.9,0.5,0.1]")
        self.targets: list[float] = []
        for t in targets:
            try:
                v = float(t)
            except (TypeError, ValueError):
                raise UserError(f"pruning.targets: {t!r} is not a number; targets are fractions in (0, 1]") from None
            if not (0.0 < v <= 1.0) or not math.isfinite(v):
                what = "MACs" if pc.get("mode", "flops") == "flops" else "channels"
                raise UserError(f"pruning.targets: {t} is outside (0, 1]; a target is the fraction of the "
                                f"unpruned {what} kept")
            self.targets.append(v)
        self.targets = sorted(set(self.targets), reverse=True)
        self.mode = str(pc.get("mode", "flops"))
        if self.mode not in MODES:
            raise unknown_name("pruning.mode", self.mode, MODES)
        alloc = str(pc.get("allocation", "auto"))
        if alloc == "auto":
            defaults = pc.get("allocation_defaults") or {}
            alloc = str(defaults.get(cfg.model.name, "global"))
        if alloc not in ALLOCATIONS:
            raise unknown_name("allocation (pruning.allocation)", alloc, ("auto",) + ALLOCATIONS)
        self.allocation = alloc
        caps = pc.get("max_fraction") or {}
        self.cap = float(caps.get(alloc, 0.95 if alloc != "uniform" else 0.9))
        if not 0.0 < self.cap < 1.0:
            raise UserError(f"pruning.max_fraction.{alloc} must be in (0, 1), got {self.cap}")
        self.tolerance = float(pc.get("tolerance", 0.005))
        if not 0.0 < self.tolerance < 0.5:
            raise UserError(f"pruning.tolerance must be in (0, 0.5), got {self.tolerance}")
        self.random_draws = int(pc.get("random_draws", 3))
        if self.random_draws < 1:
            raise UserError(f"pruning.random_draws must be >= 1, got {self.random_draws}")
        self.hybrid_from = resolve_score(str(pc.get("hybrid_counts_from", "taylor")))
        self.depthwise = bool(pc.get("depthwise_in_group_score", True))
        self.magnitude = str(pc.get("magnitude", DEFAULT_MAGNITUDE))
        if self.magnitude not in ("l1", "l2"):
            raise unknown_name("magnitude norm (pruning.magnitude)", self.magnitude, ("l1", "l2"))
        ft = pc.get("finetune") or {}
        self.finetune = bool(ft.get("enabled", False))
        self.ft = {"epochs": int(ft.get("epochs", 5)), "max_batches": ft.get("max_batches", 200),
                   "lr": float(ft.get("lr", 1e-4)), "optimizer": str(ft.get("optimizer", "adam")),
                   "weight_decay": float(ft.get("weight_decay", 0.0))}
        if self.finetune and (self.ft["epochs"] < 1 or self.ft["lr"] <= 0):
            raise UserError("pruning.finetune needs epochs >= 1 and lr > 0")
        self.eval_samples = pc.get("eval_samples")
        if self.eval_samples is not None and int(self.eval_samples) < 1:
            raise UserError(f"pruning.eval_samples must be a positive number or null, got {self.eval_samples}")
        self.eval_seed = int(pc.get("eval_seed", 0))
        cal = pc.get("calibration") or {}
        self.calibration = {"n": int(cal.get("n", 1024)), "seed": int(cal.get("seed", 0)),
                            "transform": str(cal.get("transform", "eval")),
                            "batch_size": int(cal.get("batch_size", 128)),
                            "n_feature_maps": cal.get("n_feature_maps")}
        if self.calibration["n"] < 1:
            raise UserError(f"pruning.calibration.n must be positive, got {self.calibration['n']}")
        self.latency = bool(pc.get("latency", True))
        self.latency_batch_sizes = [int(b) for b in (pc.get("latency_batch_sizes") or [1, 64])]
        self.latency_repeats = int(pc.get("latency_repeats", 10))
        self.export = bool(pc.get("export", False))
        self.fvcore_check = bool(pc.get("fvcore_check", True))
        self.device = str(pc.get("device", "auto"))
        # a bar on a terminal, one line per finished point in a log file (tracking.progress)
        self.progress = bool(OmegaConf.select(cfg, "callbacks.progress_bar", default=True))

    def needs(self, what: str) -> list[Score]:
        extra = [self.hybrid_from] if self.allocation == "hybrid" else []
        return [s for s in self.scores + extra if what in s.needs]

    def score_fingerprint(self, score: Score, ckpt: Path, input_shape, axes_digest: str | None = None) -> dict:
        """What a score's raw values depend on (the on-disk score cache): the data identity, the
        checkpoint's content and the score's own inputs; not the allocation, search or
        evaluation, so changing those never recomputes an expensive calibration score."""
        parts = {"stage": "prune/score", "v": POINT_VERSION, "score": score.name, "input": list(input_shape),
                 "magnitude": self.magnitude}
        if "calibration" in score.needs:
            parts["calibration"] = self.calibration
        if "axes" in score.needs:
            parts["axes"] = axes_digest      # analyze.py rerun with other knobs -> other values
        return _plain(run_fingerprint(self.cfg, ckpt, **parts))

    def fingerprint(self, score: Score, ckpt: Path, input_shape, axes_digest: str | None = None) -> dict:
        """What a finished point depends on; a point with another fingerprint is recomputed."""
        parts = {
            "stage": "prune/point",
            "score": fingerprint(self.score_fingerprint(score, ckpt, input_shape, axes_digest)),
            "mode": self.mode, "allocation": self.allocation, "cap": self.cap, "tol": self.tolerance,
            "depthwise": self.depthwise, "eval": [self.eval_samples, self.eval_seed],
            "finetune": self.ft if self.finetune else False, "fvcore": self.fvcore_check,
            "latency": [self.latency_batch_sizes, self.latency_repeats] if self.latency else False,
        }
        if self.allocation == "hybrid":
            parts["hybrid"] = fingerprint(self.score_fingerprint(self.hybrid_from, ckpt, input_shape, axes_digest))
        return _plain(run_fingerprint(self.cfg, ckpt, **parts))


def _plain(d: dict) -> dict:
    """``d`` as it reads back from JSON (tuples -> lists ...), so a stored key compares equal."""
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def axes_digest(table: pd.DataFrame | None) -> str | None:
    """A content hash of the analysis table the axes scores read."""
    if table is None:
        return None
    return hashlib.sha1(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes()).hexdigest()[:16]


def point_label(score: Score, draw: int) -> str:
    return f"{score.name}-d{draw}" if score.stochastic else score.name


# --------------------------------------------------------------------------------------------
# Analysis results for the axes scores
# --------------------------------------------------------------------------------------------


def _analyze_hint(cfg: DictConfig) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            over = [o for o in HydraConfig.get().overrides.task if not o.startswith(("pruning.", "stage="))]
            return "python analyze.py " + " ".join(over)
    except Exception:  # noqa: BLE001 - only a hint
        pass
    parts = [f"name={cfg.name}" if cfg.name != "default" else "", f"data={cfg.data.name}",
             f"model={cfg.model.name}", f"model.width={cfg.model.width}", f"seed={cfg.seed}"]
    return "python analyze.py " + " ".join(p for p in parts if p)


def axes_schema(scores: list[Score]) -> Schema:
    """What prune needs of ``analyze/axes.csv``: one row per channel of every conv layer and
    finite values in every column the configured scores read. A NaN would otherwise become the
    lowest keep value after min-max normalisation (:func:`minmax`) and silently move a curve."""
    cols = sorted(set().union(*(s.columns for s in scores))) if scores else []
    return Schema("axes.csv", {"layer": "str", "channel": "int", **{c: "float" for c in cols}},
                  finite=tuple(cols), layer="layer")


def _axes_loader(cfg: DictConfig, trained, scores: list[Score], layers: dict):
    names = [s.name for s in scores]
    schema = axes_schema(scores)
    rows_per_layer = {name: conv.out_channels for name, conv in layers.items()}
    rebuild = f"{_analyze_hint(cfg)} analysis.axes.recompute=true"

    def checked(table: pd.DataFrame, path: Path) -> pd.DataFrame:
        # only the pruned convs are checked: a table may hold more layers than prune reads
        part = table[table["layer"].isin(list(rows_per_layer))] if "layer" in table else table
        return check_table(part, schema, path=path, rebuild=rebuild, rows_per_layer=rows_per_layer)

    def load():
        from omegaconf.errors import ConfigAttributeError, ConfigKeyError

        cached = Path(trained.run_dir) / "analyze" / "axes.csv"
        try:
            from axes_pipeline.analyses.axes_table import load_or_compute_axes
        except ImportError:
            load_or_compute_axes = None
        if load_or_compute_axes is not None:
            try:
                return checked(load_or_compute_axes(cfg, trained), cached)
            except (ConfigAttributeError, ConfigKeyError, KeyError, AttributeError) as err:
                if not cached.is_file():
                    raise UserError(f"scores {', '.join(names)} need the analysis results, which do not exist "
                                    f"and cannot be computed from the prune config ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0][:100]}); run `{_analyze_hint(cfg)}` first") from None
        if cached.is_file():
            table = read_table(cached, Schema("axes.csv", {"layer": "str"}), rebuild=rebuild)
            return checked(table, cached)
        raise UserError(f"scores {', '.join(names)} need the analysis results ({cached}), which do not "
                        f"exist; run `{_analyze_hint(cfg)}` first")
    return load


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


class _ScoreCache:
    """Raw scores per (score, draw): in memory, and on disk for the calibration-based ones."""

    def __init__(self, ctx: ScoreContext, out: Path, settings: PruneSettings, ckpt: Path, shape, axes: str | None):
        self.ctx, self.out, self.settings, self.ckpt, self.shape, self.axes = ctx, out, settings, ckpt, shape, axes
        self.mem: dict[tuple[str, int], dict] = {}
        self.timing: dict[str, float] = {}

    def get(self, score: Score, draw: int) -> dict[str, np.ndarray]:
        key = (score.name, draw)
        if key in self.mem:
            return self.mem[key]
        path = self.out / "scores" / f"{point_label(score, draw)}.json"
        fp = self.settings.score_fingerprint(score, self.ckpt, self.shape, self.axes)
        if "calibration" in score.needs and path.is_file():
            try:
                saved = read_json(path)
                if saved.get("fingerprint") == fp:
                    values = {k: np.asarray(v, dtype=np.float64) for k, v in saved["values"].items()}
                    if _scores_sound(values, self.ctx.layers):
                        self.mem[key] = values
                        return values
                    print(f"prune: note: score cache {path.name} is damaged; recomputing it")
            except (ValueError, OSError, KeyError, TypeError, AttributeError):
                print(f"prune: note: score cache {path.name} cannot be read; recomputing it")
        t0 = time.perf_counter()
        values = score(self.ctx, draw)
        self.timing[point_label(score, draw)] = time.perf_counter() - t0
        if "calibration" in score.needs:
            write_json(path, {"score": score.name, "fingerprint": fp,
                              "seconds": self.timing[point_label(score, draw)],
                              "values": {k: v.tolist() for k, v in values.items()}})
        if len(self.mem) > 8:
            self.mem.pop(next(iter(self.mem)))
        self.mem[key] = values
        return values


def _scores_sound(values: dict, layers: dict) -> bool:
    """A cached score has one finite value per channel of every layer."""
    return (set(values) == set(layers)
            and all(v.shape == (conv.out_channels,) and np.isfinite(v).all()
                    for v, conv in ((values[n], layers[n]) for n in layers)))


def _calibration(dm, settings: PruneSettings, which: str = "n"):
    """A loader of the calibration batches (built once, on first use, then reused by every score)."""
    n = settings.calibration["n"]
    if which == "feature_maps" and settings.calibration.get("n_feature_maps"):
        n = int(settings.calibration["n_feature_maps"])
    held: list = []

    def batches():
        if not held:
            ds = dm.calibration_set(n, settings.calibration["seed"], transform=settings.calibration["transform"])
            held.append(list(dm.loader(ds, batch_size=settings.calibration["batch_size"])))
        return held[0]
    return batches


def run_prune(cfg: DictConfig) -> dict:
    """FLOPs-matched pruning of the trained run named by ``cfg``; returns the summary."""
    from axes_pipeline.models import conv_layers, example_input
    from axes_pipeline.tracking import StageTracker, cfg_artifact_name, progress
    from axes_pipeline.training.restore import restore_trained

    settings = PruneSettings(cfg)   # validates cfg.pruning: a mistake is one line, before any work
    device = resolve_device(settings.device)
    trained = restore_trained(cfg)
    out = Path(trained.run_dir) / "prune"
    dm = trained.datamodule
    model = trained.model.to(device).eval()
    example = example_input({"image_size": dm.image_size, "in_channels": getattr(dm, "in_channels", 3)},
                            device=device)
    groups = build_groups(model, example)
    cost = CostModel.build(model, groups, example)
    layers = conv_layers(model)

    axes_scores = settings.needs("axes")
    ctx = ScoreContext(model, layers, axes_loader=_axes_loader(cfg, trained, axes_scores, layers),
                       calibration=_calibration(dm, settings),
                       feature_maps=_calibration(dm, settings, "feature_maps"), seed=int(cfg.seed),
                       magnitude=settings.magnitude, device=device)
    digest = axes_digest(ctx.axes()) if axes_scores else None   # fail (or compute) now, before any point
    if len(settings.targets) < 2:
        print(f"prune: note: one target ({settings.targets[0]:g}): the points are written but a FLOPs-AUC "
              "needs at least two targets, so there is none")

    points = [(s, d, t) for s in settings.scores for d in s.draws(settings.random_draws) for t in settings.targets]
    print(f"prune: {len(settings.scores)} scores, {len(settings.targets)} targets, {len(points)} points, "
          f"allocation={settings.allocation}, mode={settings.mode}, {len(groups)} groups -> {out}")

    if groups.refused:   # convs never pruned (grouped convs): the reason travels with the results
        write_csv(out / "prune_refused.csv", pd.DataFrame(sorted(groups.refused.items()), columns=["layer", "reason"]))
    tracker = StageTracker(cfg, "prune", out)
    tracker.use_artifact("checkpoint", cfg_artifact_name("checkpoint", cfg), [trained.ckpt])
    if axes_scores:   # ctx.axes() above reused or wrote the run's analyze/axes.csv: that is the input
        analyzed = Path(trained.run_dir) / "analyze"
        tracker.use_artifact("axes", cfg_artifact_name("axes", cfg), [analyzed / "axes.csv", analyzed / "layers.csv"])
    try:
        base = _unpruned(model, dm, cost, example, settings, device, out, trained.ckpt)
        cache = _ScoreCache(ctx, out, settings, Path(trained.ckpt), example.shape, digest)
        hybrid_counts = None
        done = 0
        records: list[dict] = []
        for score, draw, target in progress(points, "prune", enabled=settings.progress,
                                            label=lambda p: f"{point_label(p[0], p[1])} @ {p[2]:g}"):
            label = point_label(score, draw)
            path = out / "points" / f"{label}__{target:g}.json"
            fp = settings.fingerprint(score, Path(trained.ckpt), example.shape, digest)
            model_ok = not settings.export or (out / "models" / f"{label}_{target:g}.pt").is_file()
            old, why = _read_point(path, fp, score, draw, target, settings, base)
            if old is not None and model_ok:
                records.append(old)
                continue
            if why:
                print(f"prune: note: {why}; recomputing it")
            raw = cache.get(score, draw)
            gscores = group_scores(groups, raw, settings.depthwise)
            if settings.allocation == "hybrid" and hybrid_counts is None:
                hybrid_counts = group_scores(groups, cache.get(settings.hybrid_from, 0), settings.depthwise)
            record = _one_point(model, groups, cost, gscores, hybrid_counts, score, draw, target, settings,
                                example, dm, device, out, cfg, base)
            record["fingerprint"] = fp
            write_json(path, record)
            records.append(record)
            done += 1
        # curves and summary are computed in full before either is written, then replaced together
        curves = curves_frame(records)
        summary = summarise(curves, base, settings, cfg, groups, cost, cache.timing)
        summary["points_computed_this_run"] = done
        plots = {}
        try:
            from axes_pipeline.pruning.plots import plot_curves, plot_sweeps

            plots.update(plot_curves(curves, base, out))
            plots.update(plot_sweeps(summary, out))
        except Exception as err:  # noqa: BLE001 - a plot must never lose the results
            log.warning("prune plots failed: %s", err)
        summary["plots"] = {k: str(v) for k, v in plots.items()}
        write_stage(out, curves, summary)
        tracker.scalars(_flat_scalars(summary), prefix="prune/")
        tracker.table("prune/curves", curves)
        tracker.log_artifact("curves", cfg_artifact_name("curves", cfg), [out / "prune_curves.csv",
                                                                           out / "prune_summary.json"])
        log_curves(tracker, curves)
        for key, p in plots.items():
            tracker.image(f"prune/{key}", p)
        _print_summary(summary, out)
        return summary
    finally:
        tracker.finish()


def log_curves(tracker, curves: pd.DataFrame) -> None:
    """Pruning curves as wandb line series, one line per score named ``score (axis)``: accuracy
    (mean over draws) against the achieved fraction of FLOPs kept, before and after fine-tuning."""
    if not tracker.enabled or curves.empty:
        return
    for acc_col, key in (("acc_before_ft", "prune/curves_chart"), ("acc_after_ft", "prune/curves_ft_chart")):
        if acc_col not in curves or curves[acc_col].isna().all():
            continue
        xs, ys = {}, {}
        for name, df in curves.groupby("score", sort=False):
            g = df.groupby("target_flops" if df["target_flops"].notna().any() else "target_channels")
            line = pd.DataFrame({"x": g["achieved_flops"].mean(), "y": g[acc_col].mean()}).dropna().sort_values("x")
            label = f"{name} ({df['axis'].iloc[0]})"
            xs[label], ys[label] = line["x"].tolist(), line["y"].tolist()
        tracker.line_series(key, list(xs.values()), ys, title=f"{acc_col} vs FLOPs kept", xname="FLOPs kept")


def write_stage(out: Path, curves: pd.DataFrame, summary: dict) -> None:
    """Replace ``prune_curves.csv`` and ``prune_summary.json`` together.

    Both are written in full to temporary files first (a failure there leaves both old ones);
    the old summary is removed before the new curves are renamed into place, so no moment shows a
    summary beside curves it does not describe (at worst: new curves and no summary, which reads
    as an unfinished stage). The summary also carries the curves' content digest
    (``curves_sha256``), which the report checks.
    """
    text = curves.to_csv(index=False)
    summary["curves_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    blob = json.dumps(summary, indent=2, default=_json_safe) + "\n"
    with atomic_path(out / "prune_summary.json") as tmp_summary:
        with atomic_path(out / "prune_curves.csv") as tmp_curves:
            tmp_curves.write_text(text)
            tmp_summary.write_text(blob)
            (out / "prune_summary.json").unlink(missing_ok=True)
        # here: new curves, no summary; next line: the new summary


def _json_safe(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _read_point(path: Path, key: dict, score: Score, draw: int, target: float, settings: PruneSettings,
                base: dict) -> tuple[dict | None, str]:
    """A stored point when it is usable as is: ``(record, "")``; else ``(None, why)`` with ``why``
    empty when there is simply nothing (or a point of other settings) to reuse, and a one-line
    note when the file is damaged."""
    if not path.is_file():
        return None, ""
    try:
        rec = read_json(path)
    except (ValueError, OSError) as err:
        return None, f"point {path.name} cannot be read ({type(err).__name__})"
    if not isinstance(rec, dict):
        return None, f"point {path.name} is not a record"
    if rec.get("fingerprint") != key:
        if isinstance(rec.get("fingerprint"), dict):
            log.info("prune: %s was computed with other settings (%s)", path.name,
                     settings_diff(rec["fingerprint"], key))
        return None, ""
    bad = point_problems(rec, score, draw, target, settings, n_val=int(base.get("n_val") or 0))
    if bad:
        return None, f"point {path.name} is damaged ({bad})"
    return rec, ""


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


def _test_loader(dm, settings: PruneSettings):
    if settings.eval_samples is None:
        return dm.test_dataloader()
    return dm.loader(dm.eval_subset(int(settings.eval_samples), settings.eval_seed))


def _val_loader(dm):
    """The validation split training carved from the training data (every "best" is chosen on
    it); None when there is none (``data.val_fraction=0``)."""
    return dm.val_dataloader() if dm.split_sizes().get("val", 0) > 0 else None


def _evaluate_splits(model, dm, settings, device, suffix: str = "before_ft") -> dict:
    """``acc_<suffix>`` etc. on the test split and ``val_acc_<suffix>`` on the validation split."""
    test = evaluate(model, _test_loader(dm, settings), device)
    val_loader = _val_loader(dm)
    val = evaluate(model, val_loader, device) if val_loader is not None else None
    tail = "" if suffix == "before_ft" else "_after_ft"
    out = {f"acc_{suffix}": test["acc"], f"top5{tail}": test["top5"], f"loss{tail}": test["loss"],
           f"val_acc_{suffix}": val["acc"] if val else None, f"val_loss{tail}": val["loss"] if val else None}
    return out


def _unpruned(model, dm, cost, example, settings, device, out, ckpt) -> dict:
    """Accuracy (validation and test), MACs, params and latency of the unpruned network
    (cached next to the points, keyed like them)."""
    path = out / "unpruned.json"
    key = _plain(run_fingerprint(settings.cfg, ckpt, stage="prune/unpruned", v=POINT_VERSION,
                                 eval=[settings.eval_samples, settings.eval_seed],
                                 latency=settings.latency and settings.latency_batch_sizes))
    if path.is_file():
        try:
            old = read_json(path)
            if (old.get("key") == key and isinstance(old.get("acc"), float) and math.isfinite(old["acc"])
                    and "val_acc" in old):
                return old
        except (ValueError, OSError, AttributeError):
            print(f"prune: note: {path.name} cannot be read; recomputing it")
    acc = evaluate(model, _test_loader(dm, settings), device)
    val_loader = _val_loader(dm)
    val = evaluate(model, val_loader, device) if val_loader is not None else {"acc": None, "loss": None, "n": 0}
    base = {"key": key, "acc": acc["acc"], "top5": acc["top5"], "loss": acc["loss"], "n_eval": acc["n"],
            "val_acc": val["acc"], "val_loss": val["loss"], "n_val": val["n"],
            "macs": cost.total, "params": count_params(model), "unsupported_ops": cost.unsupported,
            "unattributed_macs": {f"{m}:{o}": v for (m, o), v in cost.unattributed.items()}}
    if settings.latency:
        base.update(latency(model, tuple(example.shape), settings.latency_batch_sizes, settings.latency_repeats))
    write_json(path, base)
    return base


def _one_point(model, groups, cost, gscores, hybrid_counts, score, draw, target, settings, example, dm, device,
               out, cfg, base) -> dict:
    t0 = time.perf_counter()
    cap = settings.cap
    alloc = make_allocation(settings.allocation, groups, gscores, cap, counts_from=hybrid_counts,
                            seed=int(cfg.seed))
    if settings.mode == "flops":
        res = match_flops(alloc, cost, target, settings.tolerance)
    else:
        res = nominal_fraction(alloc, cost, target)
    keep = keep_masks(alloc, res.counts)
    t1 = time.perf_counter()
    pruned, history = prune_physically(model, groups, keep, example)
    t2 = time.perf_counter()
    fv, unsupported = (fvcore_macs(pruned, example) if settings.fvcore_check else (None, {}))
    macs = fv if fv is not None else res.macs
    t3 = time.perf_counter()
    acc = _evaluate_splits(pruned, dm, settings, device)
    t4 = time.perf_counter()
    kept_channels = float(sum(int(k.sum()) for k in keep)) / float(sum(k.size for k in keep))
    rec = {
        "score": score.name, "axis": score.axis, "draw": int(draw), "family": score.family,
        "param": score.param, "mode": settings.mode, "allocation": settings.allocation,
        "target_flops": target if settings.mode == "flops" else None,
        "target_channels": target if settings.mode == "channel_fraction" else None,
        "achieved_flops": macs / cost.total, "achieved_flops_analytic": res.macs / cost.total,
        # matched is judged on the count reported as achieved_flops (fvcore's when it checks)
        "macs": int(macs), "macs_analytic": int(res.macs),
        "matched": bool(abs(macs / cost.total - target) <= settings.tolerance) if settings.mode == "flops" else None,
        "refined": bool(res.refined), "channels_frac": kept_channels,
        "params_frac": count_params(pruned) / base["params"],
        **acc,
        "group_kept": {g.name: int(k.sum()) for g, k in zip(groups.groups, keep)},
        "search_s": t1 - t0, "search_evals": res.evaluations, "prune_s": t2 - t1, "fvcore_s": t3 - t2,
        "eval_s": t4 - t3,
    }
    if settings.mode == "flops" and not rec["matched"]:
        log.warning("%s: target %.3f not matched within %.3f (achieved %.4f)", point_label(score, draw), target,
                    settings.tolerance, res.frac)
    if fv is not None and fv != res.macs:
        log.warning("%s @ %g: analytic MACs %d != fvcore %d", point_label(score, draw), target, res.macs, fv)
    if settings.finetune:
        t5 = time.perf_counter()
        tuned = copy.deepcopy(pruned)
        ft = finetune(tuned, dm.train_dataloader(), device, settings.ft["epochs"], settings.ft["max_batches"],
                      settings.ft["lr"], settings.ft["optimizer"], settings.ft["weight_decay"])
        rec.update(_evaluate_splits(tuned, dm, settings, device, "after_ft"))
        rec.update({"finetune_steps": ft["steps"], "finetune_loss": ft["loss"], "finetune_s": time.perf_counter() - t5})
        if settings.export:
            pruned = tuned
    if settings.latency:
        lat = latency(pruned, tuple(example.shape), settings.latency_batch_sizes, settings.latency_repeats)
        rec.update(lat)
        rec["latency_ms"] = lat.get(f"latency_cpu_b{settings.latency_batch_sizes[0]}_ms")
        for k, v in lat.items():
            if base.get(k):
                rec[k.replace("latency_", "speedup_").replace("_ms", "")] = base[k] / v
    if settings.export:
        from axes_pipeline.pruning.export import model_spec, save_pruned

        path = out / "models" / f"{point_label(score, draw)}_{target:g}.pt"
        save_pruned(path, model_spec(cfg.model, dm.num_classes), example.shape, history, pruned,
                    meta={"score": score.name, "draw": int(draw), "target": target, "achieved_flops": rec["achieved_flops"],
                          "finetuned": bool(settings.finetune)})
        rec["export"] = str(path)
    return rec


CURVE_COLUMNS = ["score", "axis", "draw", "family", "param", "mode", "allocation", "target_flops", "target_channels",
                 "achieved_flops", "achieved_flops_analytic", "macs", "matched", "channels_frac", "params_frac",
                 "acc_before_ft", "val_acc_before_ft", "acc_after_ft", "val_acc_after_ft", "top5", "loss", "val_loss",
                 "top5_after_ft", "loss_after_ft", "val_loss_after_ft", "latency_ms"]


def curves_frame(records: list[dict]) -> pd.DataFrame:
    """``prune_curves.csv``: one row per point (the validated records of this sweep, in order)."""
    rows = [{k: v for k, v in r.items() if k not in ("group_kept", "fingerprint")} for r in records]
    df = pd.DataFrame(rows)
    for c in CURVE_COLUMNS:
        if c not in df.columns:
            df[c] = np.nan
    extra = [c for c in df.columns if c not in CURVE_COLUMNS]
    return df[CURVE_COLUMNS + extra]


#: the AUC keys of the summary and the curve column each integrates (test = measured, val = chooses)
AUC_KEYS = {"flops_auc": "acc_before_ft", "val_flops_auc": "val_acc_before_ft",
            "flops_auc_ft": "acc_after_ft", "val_flops_auc_ft": "val_acc_after_ft"}


def _mean_or_none(values) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def summarise(curves: pd.DataFrame, base: dict, settings: PruneSettings, cfg: DictConfig, groups, cost,
              score_timing: dict) -> dict:
    """FLOPs-AUC per score over one shared removed-FLOPs grid (validation and test), the best local
    and best target score chosen on validation (their test AUC reported), axis means, sweeps."""
    base_acc = float(base["acc"])
    base_val = base.get("val_acc")
    has_val = bool(base.get("n_val")) and base_val is not None
    keys = ["flops_auc", "val_flops_auc"] + (["flops_auc_ft", "val_flops_auc_ft"] if settings.finetune else [])
    keys = [k for k in keys if has_val or not k.startswith("val_")]
    unpruned = {"acc_before_ft": base_acc, "acc_after_ft": base_acc, "val_acc_before_ft": base_val,
                "val_acc_after_ft": base_val}
    res = grid_aucs(curves, [AUC_KEYS[k] for k in keys], lambda _k: unpruned, mode=settings.mode,
                    tolerance=settings.tolerance, by=("score", "draw"), targets=settings.targets)
    per_score = {}
    for score in settings.scores:
        df = curves[curves["score"] == score.name]
        entry = {"axis": score.axis, "family": score.family, "param": score.param, "points": int(len(df))}
        draws = [k for k in res["aucs"] if k[0] == score.name]
        for key in keys:
            aucs = [res["aucs"][k][AUC_KEYS[key]] for k in draws]
            mean = _mean_or_none(aucs)
            ref = base_val if key.startswith("val_") else base_acc
            entry[key] = mean
            entry[f"{key}_rel"] = mean / ref if mean is not None and ref else None
            if score.stochastic:
                got = [float(a) for a in aucs if a is not None]
                entry[f"{key}_draws"] = got
                entry[f"{key}_sd"] = float(np.std(got, ddof=1)) if len(got) > 1 else None
        why = [res["no_auc"][k] for k in draws if k in res["no_auc"]]
        if why or res["note"]:
            entry["no_auc"] = res["note"] or why[0]
        per_score[score.name] = entry

    def best(axis: str, key: str = "flops_auc"):
        """The axis's best score by its validation AUC; its test AUC is what is reported."""
        if not has_val:
            return None
        cands = [(v[f"val_{key}"], k) for k, v in per_score.items() if v["axis"] == axis and v.get(f"val_{key}") is not None]
        if not cands:
            return None
        val, name = max(cands)   # ties broken by name: deterministic
        return {"score": name, "chosen_on": SELECTION_SPLIT, "measured_on": MEASUREMENT_SPLIT,
                f"val_{key}": val, key: per_score[name][key], f"{key}_rel": per_score[name][f"{key}_rel"]}

    axis_means = {}
    for axis in AXES:
        vals = [v["flops_auc"] for v in per_score.values() if v["axis"] == axis and v["flops_auc"] is not None]
        axis_means[axis] = float(np.mean(vals)) if vals else None
    bl, bt = best("local"), best("target")
    sweeps = {}
    for prefix, fam in FAMILIES.items():
        pts = sorted((v["param"], k) for k, v in per_score.items() if v["family"] == prefix)
        anchor_name = fam["anchor"].format(magnitude=settings.magnitude)  # the sweep at parameter 0
        if anchor_name in per_score:
            pts = [(0.0, anchor_name)] + pts
        if pts:
            points = [{"param": p, "score": s, "flops_auc": per_score[s]["flops_auc"],
                       "val_flops_auc": per_score[s].get("val_flops_auc")} for p, s in pts]
            chosen = [(p["val_flops_auc"], p["score"]) for p in points if p["val_flops_auc"] is not None]
            sweeps[prefix] = {"symbol": fam["symbol"], "label": fam["label"], "points": points,
                              "best": (dict(next(p for p in points if p["score"] == max(chosen)[1]),
                                            chosen_on=SELECTION_SPLIT) if chosen else None)}
    matched = curves["matched"].dropna() if "matched" in curves else pd.Series(dtype=bool)
    dev = (curves["achieved_flops"] - curves["target_flops"]).abs() if settings.mode == "flops" else pd.Series(dtype=float)
    fv_diff = (curves["macs"] - curves["macs_analytic"]).abs() if len(curves) else pd.Series(dtype=float)
    grid = res["grid"]
    return {
        "unpruned": {k: v for k, v in base.items() if k != "key"},
        "unpruned_acc": base_acc, "unpruned_val_acc": base_val, "unpruned_macs": int(base["macs"]),
        "mode": settings.mode, "allocation": settings.allocation, "max_fraction": settings.cap,
        "tolerance": settings.tolerance, "targets": settings.targets,
        "selection": {"chosen_on": SELECTION_SPLIT if has_val else None, "measured_on": MEASUREMENT_SPLIT,
                      "n_val": int(base.get("n_val") or 0), "n_test": int(base.get("n_eval") or 0),
                      "note": "" if has_val else ("no validation split (data.val_fraction=0): no best score is "
                                                  "chosen, since choosing on test would bias the comparison")},
        "flops_auc_grid": {"removed_flops": grid, "interval": [grid[0], grid[-1]] if grid else None,
                           "shared_by": "every score and draw of this run, with the unpruned network at 0",
                           "off_target_points": res["off_target"], "note": res["note"]},
        "groups": len(groups), "group_sizes": {g.name: g.size for g in groups.groups},
        "scores": per_score,
        "best_local": bl, "best_target": bt,
        "best_local_minus_best_target": (bl["flops_auc"] - bt["flops_auc"])
        if bl and bt and bl["flops_auc"] is not None and bt["flops_auc"] is not None else None,
        "axis_means": axis_means,
        "sweeps": sweeps,
        "matching": {"points": int(len(curves)), "unmatched": int((~matched.astype(bool)).sum()) if len(matched) else 0,
                     "max_abs_deviation": float(dev.max()) if len(dev.dropna()) else None},
        "analytic_vs_fvcore_max_abs_macs": float(fv_diff.max()) if len(fv_diff.dropna()) else None,
        "score_seconds": score_timing,
        "config": to_container(cfg),
    }


def _flat_scalars(summary: dict) -> dict:
    flat = {"unpruned_acc": summary["unpruned"]["acc"], "unpruned_macs": summary["unpruned"]["macs"]}
    for name, v in summary["scores"].items():
        for key in ("flops_auc", "flops_auc_rel", "val_flops_auc"):
            if v.get(key) is not None:
                flat[f"{key}/{name}"] = v[key]
    for axis, v in summary["axis_means"].items():
        if v is not None:
            flat[f"axis_mean/{axis}"] = v
    if summary["best_local_minus_best_target"] is not None:
        flat["best_local_minus_best_target"] = summary["best_local_minus_best_target"]
    return flat


def _fmt(v, spec=".4f") -> str:
    return "—" if v is None else format(v, spec)


def _print_summary(summary: dict, out: Path) -> None:
    rows = sorted(summary["scores"].items(),
                  key=lambda kv: -(kv[1]["flops_auc"] if kv[1]["flops_auc"] is not None else -1))
    print(f"prune: unpruned acc={summary['unpruned']['acc']:.4f} (val {_fmt(summary['unpruned_val_acc'])}), "
          f"MACs={summary['unpruned']['macs']:,}")
    grid = summary["flops_auc_grid"]
    if grid["note"]:
        print(f"prune: note: {grid['note']}")
    else:
        print(f"prune: FLOPs-AUC over removed FLOPs [{grid['interval'][0]:g}, {grid['interval'][1]:g}] for every score"
              + (f"; {grid['off_target_points']} point(s) off target dropped" if grid["off_target_points"] else ""))
    for name, v in rows:
        print(f"  {name:28s} {v['axis']:8s} FLOPs-AUC test={_fmt(v['flops_auc'])} val={_fmt(v.get('val_flops_auc'))} "
              f"(rel {_fmt(v['flops_auc_rel'], '.3f')})")
    bl, bt = summary["best_local"], summary["best_target"]
    if bl and bt:
        print(f"prune: best local {bl['score']} {_fmt(bl['flops_auc'])} vs best target {bt['score']} "
              f"{_fmt(bt['flops_auc'])} (chosen on {bl['chosen_on']}, test accuracy) -> {out}")
    else:
        if summary["selection"]["note"]:
            print(f"prune: note: {summary['selection']['note']}")
        print(f"prune: results in {out}")
