"""Lesions and peer replacement (METHODS §8): does peer support refine removability?

For a seeded sample of channels per layer (``analysis.lesion.channels``: ``auto`` = 64, N, ``all``):

- **damage** of a lesion (filter, bias, BN γ and β of the channel zeroed, no fine-tuning) on a
  fixed seeded subset of the test split: ``damage_loss`` = increase of the mean cross-entropy,
  ``damage_acc`` = drop of top-1 accuracy (both positive when the lesion hurts);
- **peer replacement**: the channel's pre-BN signal replaced by its linear prediction from its
  hull (``replaced_hull_*``) or from all other channels (``replaced_all_*``), fitted on the
  calibration samples of the axes with the metrics' ridge, applied at every position;
  ``recovery_<v> = 1 − damage_replaced / damage_lesion`` (NaN when the lesion's loss damage is
  below ``min_damage``: nothing to recover);
- **analysis**: within ``n_bins`` quantile bins of I_T (``task_info``), Spearman between damage
  and each predictor; the incremental R² of the peer terms (``full_explained``, ``hull_score``)
  over ``input_capture`` + ``task_info`` with a bootstrap CI and the F-test p; recovery against
  the explained variance. Dead channels (all their metrics are 0 by definition) are lesioned and
  listed but left out of the statistics.

All lesions of one layer are evaluated together by :class:`~axes_pipeline.analyses.lesion_engine.LesionEngine`
(prefix once per batch, lesions folded into the batch). Each finished layer is kept in ``lesion_parts/``
with a fingerprint of everything it depends on, so an interrupted run resumes at the next layer.

Outputs in ``<run_dir>/analyze/``: ``lesions.csv``, ``lesion_binned.csv``,
``lesion_summary.json``, ``plots/lesion_damage.png``, ``plots/lesion_recovery.png``.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats as _st

from axes_pipeline.analyses import plots
from axes_pipeline.analyses.lesion_engine import (
    LesionEngine,
    Lesions,
    evaluate,
    hull_members,
    materialise,
    peer_regression,
    standardised,
    trace,
)
from axes_pipeline.analyses.registry import analysis
from axes_pipeline.analyses.settings import LesionAnalysis
from axes_pipeline.axes.table import axes_fingerprint
from axes_pipeline.console import progress as units_progress
from axes_pipeline.errors import UserError, unknown_name
from axes_pipeline.metrics.gaussian import standardise
from axes_pipeline.models.taylor import taylor_scores
from axes_pipeline.runs import Stamp, write_csv, write_json
from axes_pipeline.stats import binned_spearman, incremental_r2, spearman
from axes_pipeline.tables import DamagedTable, Schema, read_table

log = logging.getLogger("axes_pipeline")

#: Peer sets a lesioned channel can be replaced from.
VARIANTS = ("hull", "all")
#: Axes-table columns copied next to each lesion.
AXES_COLUMNS = ("input_capture", "peer_overlap", "full_explained", "hull_size", "hull_explained", "hull_saturated",
                "hull_score", "task_info", "target_excess", "task_redundancy", "task_unique", "l1", "l2",
                "bn_scale", "dead")
#: Columns that can predict damage: the numeric axes-table columns, plus ``taylor`` computed here.
KNOWN_PREDICTORS = (*(c for c in AXES_COLUMNS if c not in ("hull_saturated", "dead")), "taylor")
#: Axes-table columns the lesion analysis reads (hull sizes for the replacement, predictors).
LESION_AXES_COLUMNS = ("layer", "layer_index", "channel", "hull_size", *AXES_COLUMNS)
#: the local-axis replaceability columns whose direction the lesions check (METHODS §8, §9)
REPLACEABILITY = ("hull_score", "peer_overlap")
R2_SCALES = ("raw", "rank")
PARTS = "lesion_parts"
AUTO_CHANNELS = 64   # METHODS §8 default sample per layer
POOLED = "(all, within-layer ranks)"


# ---- knobs -----------------------------------------------------------------------------------


def lesion_settings(block: LesionAnalysis) -> dict:
    """The ``analysis.lesion`` block as plain values, checked beyond what its schema declares (the numeric
    ranges are the schema's, checked before the stage: :func:`axes_pipeline.bounds.check_bounds`):
    :class:`UserError` for a bad value."""
    s = asdict(block)
    ch = s["channels"]
    if not (ch in ("all", "auto") or (isinstance(ch, int) and not isinstance(ch, bool))):
        raise UserError(f"analysis.lesion.channels must be a positive integer, 'auto' or 'all', got {ch!r}")
    replace = _check_names(s["replace"], VARIANTS, "analysis.lesion.replace variant")
    s["replace"] = [v for v in VARIANTS if v in replace]
    s["predictors"] = _check_names(s["predictors"], KNOWN_PREDICTORS, "analysis.lesion predictor")
    for key in ("base_terms", "peer_terms"):
        s[key] = _check_names(s[key], KNOWN_PREDICTORS, f"analysis.lesion.{key} column")
        if not s[key]:
            raise UserError(f"analysis.lesion.{key} needs at least one column")
    _check_names(s["r2_scale"], R2_SCALES, "analysis.lesion.r2_scale")
    rows = s["max_rows"]
    if rows != "auto" and (isinstance(rows, bool) or not isinstance(rows, int)):
        raise UserError(f"analysis.lesion.max_rows must be a positive integer or auto, got {rows!r}")
    s["max_rows"] = None if rows == "auto" else rows
    return s


def _check_names(value, known: tuple[str, ...], what: str) -> list[str]:
    """``value`` (one name, a list of names or null) as a list of known names."""
    names = [value] if isinstance(value, str) else list(value or [])
    for v in names:
        if v not in known:
            raise unknown_name(what, str(v), known)
    return names


def lesion_layers(settings: dict, units: dict) -> list[str]:
    """The layers to lesion: ``analysis.lesion.layers`` (null = every analysed conv layer)."""
    layers = settings["layers"]
    if layers is None:
        return list(units)
    layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [n for n in layers if n not in units]
    if unknown:
        raise UserError(f"analysis.lesion.layers: {unknown[0]!r} is not an analysed conv layer; available: "
                        f"{', '.join(units)} (capture.layers decides which are analysed)")
    return [n for n in units if n in layers]  # forward order


def select_channels(n_channels: int, count, seed: int, layer: str) -> np.ndarray:
    """``count`` channels of a layer drawn without replacement (seeded per layer), sorted; ``all``: every one;
    ``auto``: METHODS' 64, or every channel of a layer that has fewer."""
    if count == "auto":
        count = min(AUTO_CHANNELS, n_channels)
    if count == "all" or int(count) >= n_channels:
        return np.arange(n_channels)
    rng = np.random.default_rng([int(seed), zlib.crc32(layer.encode())])
    return np.sort(rng.choice(n_channels, size=int(count), replace=False))


def check_lesion_analysis(ctx, block: LesionAnalysis) -> None:
    """Validate the lesion knobs against the restored model before the network runs."""
    capture, metrics = ctx.knobs.capture, ctx.knobs.metrics
    s = lesion_settings(block)
    layers = lesion_layers(s, ctx.units)
    if s["channels"] not in ("all", "auto"):
        # N is "at most N per layer", as auto's 64 is: a smaller layer (EfficientNet-B0's squeeze-excitation
        # convs have 4 channels) is lesioned whole, said once; only N < 1, wrong on every layer, is refused
        small = [f"{name} ({c})" for name in layers if (c := ctx.units[name].out_channels) < s["channels"]]
        if small:
            log.info("analysis.lesion.channels=%d: %d layer(s) have fewer channels and are lesioned whole: %s",
                     s["channels"], len(small), ", ".join(small[:5]) + (f" (+{len(small) - 5} more)" if len(small) > 5 else ""))
    if s["replace"]:
        if capture.point != "pre_bn":
            raise UserError(f"peer replacement is fitted on pre-BN samples but capture.point={capture.point}; "
                            f"use capture.point=pre_bn or analysis.lesion.replace=[]")
        if "hull" in s["replace"] and metrics.hull_order != "correlation":
            raise UserError("hull replacement needs each channel's hull members, which the metrics expose only for "
                            "metrics.hull_order=correlation; use it, or analysis.lesion.replace=[all]")
        if capture.spatial == "gap":
            log.warning("lesion: capture.spatial=gap fits the peer regression on pooled samples but applies it at "
                        "every position; capture.spatial=sample is the protocol")
    if ctx.trained is not None and ctx.trained.datamodule.split_sizes()["test"] < 1:
        raise UserError("the test split is empty; lesions are evaluated on it")


# ---- one layer -------------------------------------------------------------------------------


def lesion_layer(model, unit, acts: torch.Tensor | None, target: torch.Tensor | None, axes_rows: pd.DataFrame,
                 channels: np.ndarray, batches, *, replace: list[str], ridge: float, device, graph=None,
                 max_rows: int | None = None, max_gb: float = 2.0, cov: torch.Tensor | None = None,
                 mean: torch.Tensor | None = None) -> tuple[pd.DataFrame, bool]:
    """Lesion and replace ``channels`` of one unit: ``(rows, batched_prefix)``, one row per channel (mean
    losses/accuracies). ``acts: [N, C]`` pre-BN calibration samples (or the capture's ``cov`` and ``mean``),
    ``axes_rows``: the layer's axes table indexed by channel (``hull_size`` is read from it)."""
    c = unit.out_channels
    chans = [int(i) for i in channels]
    parts = [Lesions.zero(chans, c)]
    rows = {"channel": np.asarray(chans)}
    # one covariance per layer: the capture's streamed one (``cov``, ``mean``) or from the samples
    std = (standardise(cov) if cov is not None else standardised(acts, target)) if replace else None
    if "hull" in replace:
        size = axes_rows["hull_size"].reindex(range(c)).fillna(0).astype(int).to_numpy()
        members = hull_members(acts, size, chans, target, std=std)
        coef, off, r2 = peer_regression(acts, chans, members, ridge, target, std=std, mean=mean)
        parts.append(Lesions.replace(chans, coef, off))
        rows["hull_members"] = [";".join(map(str, m)) for m in members]
        rows["fit_hull_explained"] = r2.numpy()
    if "all" in replace:
        coef, off, r2 = peer_regression(acts, chans, "all", ridge, target, std=std, mean=mean)
        parts.append(Lesions.replace(chans, coef, off))
        rows["fit_full_explained"] = r2.numpy()
    # One no-op row (a channel "replaced" by itself): the layer's unlesioned loss through the very
    # same batched path as its lesions, so damage never mixes two numeric paths (batch shapes,
    # TF32 kernels on a GPU can differ at the level of small damages).
    coef_self = torch.zeros(1, c, dtype=torch.float64)
    coef_self[0, chans[0]] = 1.0
    parts.append(Lesions.replace(chans[:1], coef_self, torch.zeros(1, dtype=torch.float64)))
    engine = LesionEngine(model, unit, graph=graph, max_rows=max_rows, max_gb=max_gb)
    res = engine.evaluate(batches, Lesions.cat(parts), device)
    k = len(chans)
    for i, v in enumerate(["lesion", *replace]):
        rows[f"loss_{v}"] = res.loss[i * k:(i + 1) * k]
        rows[f"acc_{v}"] = res.acc[i * k:(i + 1) * k]
    rows["loss_base"] = np.full(k, res.loss[-1])
    rows["acc_base"] = np.full(k, res.acc[-1])
    return pd.DataFrame(rows), engine.batched_prefix


# ---- statistics ------------------------------------------------------------------------------


def it_bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-count quantile bin (0 = lowest) of each value; ties share a bin (the rule of
    :func:`axes_pipeline.stats.binned_spearman`)."""
    v = np.asarray(values, dtype=float)
    out = np.full(v.shape, -1)
    ok = ~np.isnan(v)
    if ok.any():
        r = _st.rankdata(v[ok], method="min")
        out[ok] = np.minimum(((r - 0.5) / ok.sum() * n_bins).astype(int), n_bins - 1)
    return out


def _ranked(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Within-layer percentile ranks of ``cols``: the layers' different damage scales drop out and
    a few heavy-tailed damages cannot carry the fit."""
    return df.groupby("layer")[cols].rank(pct=True)


def recovery(damage_lesion: np.ndarray, damage_replaced: np.ndarray, min_damage: float) -> np.ndarray:
    """``1 − damage_replaced / damage_lesion``; NaN where the lesion damage is below ``min_damage``."""
    d = np.asarray(damage_lesion, dtype=float)
    ok = d > max(min_damage, 0.0)
    out = np.full(d.shape, np.nan)
    out[ok] = 1.0 - np.asarray(damage_replaced, dtype=float)[ok] / d[ok]
    return out


def analyse(df: pd.DataFrame, s: dict) -> tuple[pd.DataFrame, dict]:
    """Binned Spearman table and the summary statistics of a finished lesion table."""
    live = df[~df["dead"].astype(bool)].copy()
    preds = [p for p in s["predictors"] if p in live]
    binned = []
    # Pooled over layers on within-layer percentile ranks (as the rank-scale ΔR²): on raw values
    # layers differ in both I_T and damage scale, so each I_T bin would mostly sort layers.
    pooled_ranks = _ranked(live, ["damage_loss", "task_info", *[p for p in preds if p != "task_info"]])
    for name, g in [(POOLED, pooled_ranks), *live.groupby("layer", sort=False)]:
        b = binned_spearman(g["damage_loss"].to_numpy(float), {p: g[p].to_numpy(float) for p in preds},
                            g["task_info"].to_numpy(float), n_bins=s["n_bins"])
        b.insert(0, "layer", name)
        binned.append(b)
    binned_df = pd.concat(binned, ignore_index=True)
    pooled = binned_df[binned_df["layer"] == POOLED]

    summary: dict = {
        "spearman_overall": {p: spearman(live["damage_loss"], live[p])[0] for p in preds},
        "binned_rho_mean": {p: _nanmean(pooled.loc[pooled["predictor"] == p, "rho"]) for p in preds},
    }
    base, extra = list(s["base_terms"]), list(s["peer_terms"])
    cols = ["damage_loss", *base, *extra]

    def r2_of(frame: pd.DataFrame, scale: str) -> dict:
        if scale == "rank":
            frame = _ranked(frame, cols)
        # resampled within layers: a layer's channels share a damage scale (not exchangeable)
        return incremental_r2(frame["damage_loss"].to_numpy(float), frame[base].to_numpy(float),
                              frame[extra].to_numpy(float), n_boot=s["n_boot"], seed=s["seed"],
                              strata=live.loc[frame.index, "layer"].to_numpy())

    other = next(x for x in R2_SCALES if x != s["r2_scale"])
    summary["incremental_r2"] = {
        "base": base, "extra": extra, "scale": s["r2_scale"], "pooled": r2_of(live, s["r2_scale"]),
        "per_layer": {name: r2_of(g, s["r2_scale"]) for name, g in live.groupby("layer", sort=False)},
        f"pooled_{other}": r2_of(live, other)}
    rec: dict = {}
    for v in s["replace"]:
        vals = live[f"recovery_{v}"].to_numpy(float)
        rec[f"{v}_mean"] = _nanmean(vals)
        rec[f"{v}_median"] = float(np.nanmedian(vals)) if np.isfinite(vals).any() else math.nan
        rec[f"{v}_n"] = int(np.isfinite(vals).sum())
        for x in ("full_explained", "hull_explained"):
            rec[f"rho_{v}_{x}"] = spearman(vals, live[x].to_numpy(float))[0]
    summary["recovery"] = rec
    per_layer = {}
    for name, g in df.groupby("layer", sort=False):
        row = {"lesioned": int(len(g)), "damage_loss_median": float(g["damage_loss"].median()),
               "damage_acc_median": float(g["damage_acc"].median())}
        for v in s["replace"]:
            r = g[f"recovery_{v}"].to_numpy(float)
            row[f"recovery_{v}_median"] = float(np.nanmedian(r)) if np.isfinite(r).any() else math.nan
        per_layer[name] = row
    summary["per_layer"] = per_layer
    summary["replaceability_spearman"] = replaceability_spearman(live)
    return binned_df, summary


def replaceability_spearman(live: pd.DataFrame) -> dict:
    """Within each layer (layers differ in damage scale), Spearman between zero-lesion damage (loss) and
    replaceability. The pruning scores treat replaceability (E_full/max(1,|H|), R̄_X) as *removability*: a
    channel its peers stand in for should hurt less when zeroed, so these ρ should be negative.
    ``{column: {"per_layer": {layer: ρ}, "mean": mean ρ over layers, "layers_negative": count}}``."""
    out: dict = {"expected_sign": -1, "damage": "damage_loss"}
    for col in (c for c in REPLACEABILITY if c in live):
        per = {name: spearman(g["damage_loss"].to_numpy(float), g[col].to_numpy(float))[0]
               for name, g in live.groupby("layer", sort=False)}
        vals = np.array([v for v in per.values() if np.isfinite(v)])
        out[col] = {"per_layer": per, "mean": float(vals.mean()) if vals.size else math.nan,
                    "layers_negative": int((vals < 0).sum()), "layers": int(vals.size)}
    return out


def _nanmean(x) -> float:
    x = np.asarray(x, dtype=float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else math.nan


# ---- plots -----------------------------------------------------------------------------------


def plot_damage(df: pd.DataFrame, predictors: list[str], n_bins: int, path: Path) -> Path:
    """Damage (Δ loss) against each predictor, coloured by I_T bin."""
    import matplotlib.pyplot as plt

    d = df[~df["dead"].astype(bool)]
    preds = [p for p in predictors if p in d]
    cols = min(4, max(len(preds), 1))
    rows = math.ceil(max(len(preds), 1) / cols)
    fig, grid = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis", n_bins)
    sc = None
    for ax, p in zip(grid.flat, preds):
        sc = ax.scatter(d[p], d["damage_loss"], c=d["it_bin"], cmap=cmap, vmin=-0.5, vmax=n_bins - 0.5, s=7)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel(p + (" (magnitude)" if p == "l1" else ""), fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(grid.flat)[len(preds):]:
        ax.axis("off")
    fig.supylabel("damage_loss  (Δ cross-entropy)")
    if sc is not None:
        fig.colorbar(sc, ax=grid, shrink=0.6, ticks=range(n_bins), label="task_info bin")
    return plots.save_figure(fig, path)


def plot_recovery(df: pd.DataFrame, variants: list[str], n_bins: int, path: Path) -> Path:
    """Recovery of each replacement variant against ``full_explained`` (clipped to [-1, 1.5] for display)."""
    import matplotlib.pyplot as plt

    d = df[~df["dead"].astype(bool)]
    fig, grid = plt.subplots(1, max(len(variants), 1), figsize=(4.8 * max(len(variants), 1), 3.6), squeeze=False)
    fig.subplots_adjust(wspace=0.3)
    cmap = plt.get_cmap("viridis", n_bins)
    sc = None
    for ax, v in zip(grid.flat, variants):
        sc = ax.scatter(d["full_explained"], d[f"recovery_{v}"].clip(-1, 1.5), c=d["it_bin"], cmap=cmap,
                        vmin=-0.5, vmax=n_bins - 0.5, s=7)
        ax.axhline(1, color="k", lw=0.5, ls="--")
        ax.axhline(0, color="k", lw=0.5)
        ax.set(xlabel="full_explained  E_full", ylabel=f"recovery_{v}", title=f"replacement from {v} peers")
    if sc is not None:
        fig.colorbar(sc, ax=grid, ticks=range(n_bins), label="task_info bin", shrink=0.8)
    fig.suptitle("recovery = 1 − damage_replaced / damage_lesion (clipped to [−1, 1.5])", fontsize=9)
    return plots.save_figure(fig, path)


# ---- the stage -------------------------------------------------------------------------------


def part_settings(s: dict, n_eval: int) -> dict:
    """The lesion knobs a finished layer part depends on; with the axes' identity
    (``run_fingerprint``) they key ``lesion_parts/`` (a part with another key is recomputed)."""
    return {**{f"lesion.{k}": s[k] for k in ("channels", "seed", "replace")}, "lesion.eval_samples": n_eval}


def _read_part(path: Path, layer: str, n_rows: int, replace: list[str]) -> pd.DataFrame | None:
    """A stored layer part when it is sound (one row per lesioned channel, every loss and accuracy finite);
    None (recompute, with a note) when it is damaged."""
    losses = {f"{m}_{v}": "float" for v in ["lesion", *replace, "base"] for m in ("loss", "acc")}
    schema = Schema("lesion part", columns={"layer": "str", "layer_index": "int", "channel": "int", **losses},
                    finite=tuple(losses), layer="layer")
    try:
        return read_table(path, schema, rebuild="python analyze.py analysis=lesion", rows_per_layer={layer: n_rows})
    except DamagedTable as err:
        log.warning("lesion: %s; recomputing that layer", str(err).split("; rebuild")[0])
        return None


def check_axes_columns(axes: pd.DataFrame, path: Path) -> None:
    """One line naming the missing axes-table columns, before any lesion runs."""
    missing = [c for c in LESION_AXES_COLUMNS if c not in axes.columns]
    if missing:
        raise DamagedTable(f"{path} lacks column(s) {', '.join(dict.fromkeys(missing))} that the lesion analysis "
                           f"reads; rebuild it with `python analyze.py analysis.axes.recompute=true <same overrides>`")


def _eval_batches(dm, s: dict, device) -> tuple[list, int]:
    n_test = dm.split_sizes()["test"]
    ev = s["eval_samples"]
    n = n_test if ev is None else min(ev, n_test)
    if ev is not None and ev > n_test:
        log.info("lesion: eval_samples=%s > test split (%d images); using the whole test split", ev, n_test)
    ds = dm.eval_subset(None if n == n_test else n, seed=int(s["seed"]))
    return materialise(dm.loader(ds, batch_size=int(s["batch_size"])), device), n


def _taylor(capture, trained, units: dict, layers: list[str], s: dict, device) -> dict[str, np.ndarray]:
    """The Taylor predictor (Σ|w·∂L/∂w|) on ``taylor_images`` calibration images of ``capture.*``'s seed."""
    if s["taylor_images"] == 0 or "taylor" not in s["predictors"]:
        return {}
    dm = trained.datamodule
    n = min(int(s["taylor_images"]), dm.split_sizes()["train"])
    cal = dm.calibration_set(n, seed=int(capture.seed), transform=capture.transform)
    batches = materialise(dm.loader(cal, batch_size=int(capture.batch_size)), device)
    return taylor_scores(trained.model, {n_: units[n_].conv for n_ in layers}, batches, device)


@analysis("lesion", check=check_lesion_analysis)
def run_lesion_analysis(ctx, block: LesionAnalysis) -> dict:
    """METHODS §8 on the restored run in ``ctx``; writes the lesion files, returns the headline."""
    knobs, trained, out, device = ctx.knobs, ctx.trained, ctx.out, ctx.device
    s = lesion_settings(block)
    t0 = time.perf_counter()
    layers = lesion_layers(s, ctx.units)
    check_axes_columns(ctx.axes, out / "axes.csv")   # before the network runs
    model = trained.model.to(device).eval()
    batches, n_eval = _eval_batches(trained.datamodule, s, device)
    base = evaluate(model, batches, device)
    base_loss, base_acc = float(base.loss[0]), float(base.acc[0])

    # the parts depend on the axes table they were computed beside, the lesion knobs and the images
    stamp = Stamp(out / PARTS / "fingerprint.json",
                  {**axes_fingerprint(knobs, trained.data_id, trained.ckpt), **part_settings(s, n_eval)})
    resume = bool(s["resume"]) and stamp.current   # none, unreadable or other: the parts are recomputed, never trusted
    if not resume:
        with stamp.writing():
            for stale in (out / PARTS).glob("*.csv"):
                stale.unlink()

    graph = trace(model)
    axes = ctx.axes
    parts, batched, t_lesion, n_lesions = [], {}, 0.0, 0
    for name in units_progress(layers, "lesion", label=str):
        unit = ctx.units[name]
        part = out / PARTS / f"{name}.csv"
        chans = select_channels(unit.out_channels, s["channels"], s["seed"], name)
        stored = _read_part(part, name, len(chans), s["replace"]) if resume and part.exists() else None
        if stored is not None:
            parts.append(stored)
            continue
        rows_axes = axes[axes["layer"] == name].set_index("channel")
        t = time.perf_counter()
        rows, batched[name] = lesion_layer(
            model, unit, None, None, rows_axes, chans, batches, replace=s["replace"], ridge=float(knobs.metrics.ridge),
            device=device, graph=graph, max_rows=s["max_rows"], max_gb=float(s["max_gb"]), cov=ctx.capture.cov(name),
            mean=ctx.capture.channel_mean(name))
        t_lesion += time.perf_counter() - t
        n_lesions += len(chans) * (1 + len(s["replace"]))
        rows.insert(0, "layer", name)
        rows.insert(1, "layer_index", int(rows_axes["layer_index"].iloc[0]) if len(rows_axes) else -1)
        write_csv(part, rows)
        parts.append(rows)
    taylor = _taylor(knobs.capture, trained, ctx.units, layers, s, device)
    model.cpu()

    df = _finish_table(pd.concat(parts, ignore_index=True), axes, taylor, s)
    binned_df, stats = analyse(df, s)
    write_csv(out / "lesions.csv", df)
    write_csv(out / "lesion_binned.csv", binned_df)
    summary = {"base_loss": base_loss, "base_acc": base_acc, "eval_samples": n_eval, "layers": len(layers),
               "channels_lesioned": int(len(df)), "replace": s["replace"], "resumed_layers": len(layers) - len(batched),
               "batched_prefix": batched, "lesions_per_s": n_lesions / t_lesion if t_lesion > 0 else None, **stats,
               "wall_time_s": round(time.perf_counter() - t0, 2)}
    write_json(out / "lesion_summary.json", summary)

    if knobs.plots:
        figs = [plot_damage(df, s["predictors"], s["n_bins"], out / "plots" / "lesion_damage.png")]
        if s["replace"]:
            figs.append(plot_recovery(df, s["replace"], s["n_bins"], out / "plots" / "lesion_recovery.png"))
        for f in figs:
            ctx.tracker.image(f"analyze/{f.stem}", f)
    ctx.tracker.table("analyze/lesions", df)
    ctx.tracker.table("analyze/lesion_binned", binned_df)

    headline = _headline(summary, s)
    r2 = summary["incremental_r2"]["pooled"]
    rec = " ".join(f"{v} {headline.get(f'recovery_{v}_median', math.nan):.2f}" for v in s["replace"])
    print(f"lesion: {len(df)} channels in {len(layers)} layers; ΔR²(peer terms, {s['r2_scale']}) = "
          f"{r2['delta_r2']:.3f}, adjusted {r2['delta_r2_adj']:.3f} [{r2['ci_adj_lo']:.3f}, {r2['ci_adj_hi']:.3f}], "
          f"F-test p = {r2['p_f']:.3g}"
          + (f"; median recovery {rec}" if rec else ""))
    return headline


def _finish_table(df: pd.DataFrame, axes: pd.DataFrame, taylor: dict, s: dict) -> pd.DataFrame:
    """Damage, recovery, the predictors and the I_T bin of every lesioned channel."""
    df = df.copy()
    loss0, acc0 = df["loss_base"], df["acc_base"]   # each layer's own unlesioned pass (see lesion_layer)
    df["damage_loss"] = df["loss_lesion"] - loss0
    df["damage_acc"] = acc0 - df["acc_lesion"]
    for v in s["replace"]:
        df[f"replaced_{v}_damage_loss"] = df[f"loss_{v}"] - loss0
        df[f"replaced_{v}_damage_acc"] = acc0 - df[f"acc_{v}"]
        df[f"recovery_{v}"] = recovery(df["damage_loss"], df[f"replaced_{v}_damage_loss"], s["min_damage"])
    cols = [c for c in AXES_COLUMNS if c in axes]
    df = df.merge(axes[["layer", "channel", *cols]], on=["layer", "channel"], how="left")
    df["taylor"] = np.nan
    for name, vals in taylor.items():
        sel = df["layer"] == name
        df.loc[sel, "taylor"] = vals[df.loc[sel, "channel"].to_numpy()]
    # I_T bin within the channel's own layer (the bins of lesion_binned.csv's per-layer rows)
    live_it = df["task_info"].where(~df["dead"].astype(bool))
    df["it_bin"] = live_it.groupby(df["layer"]).transform(lambda v: pd.Series(it_bins(v.to_numpy(float), s["n_bins"]),
                                                                               index=v.index))
    replaced = [f"replaced_{v}_damage_{m}" for v in s["replace"] for m in ("loss", "acc")]
    first = ["layer", "layer_index", "channel", "damage_loss", "damage_acc", *replaced, *[f"recovery_{v}" for v in s["replace"]]]
    return df[first + [c for c in df.columns if c not in first]]


def _headline(summary: dict, s: dict) -> dict:
    r2 = summary["incremental_r2"]["pooled"]
    h = {"base_loss": summary["base_loss"], "base_acc": summary["base_acc"], "layers": summary["layers"],
         "channels_lesioned": summary["channels_lesioned"], "lesions_per_s": summary["lesions_per_s"],
         "delta_r2": r2["delta_r2"], "delta_r2_ci_lo": r2["ci_lo"], "delta_r2_ci_hi": r2["ci_hi"],
         "delta_r2_adj": r2["delta_r2_adj"], "delta_r2_adj_ci_lo": r2["ci_adj_lo"],
         "delta_r2_adj_ci_hi": r2["ci_adj_hi"], "delta_r2_p_f": r2["p_f"], "r2_n": r2["n"]}
    rec = summary["recovery"]
    for v in s["replace"]:
        h.update({f"recovery_{v}_{stat}": rec[f"{v}_{stat}"] for stat in ("mean", "median")})
        h[f"rho_recovery_{v}_full_explained"] = rec[f"rho_{v}_full_explained"]
    h.update({f"binned_rho_{p}": v for p, v in summary["binned_rho_mean"].items()})
    return h
