"""The two axes of every channel of every conv layer (METHODS §1-§5), as tables.

``layer_analysis`` turns one layer's captured moments into its per-channel row block and its
per-layer summary; ``analyze_capture`` runs it over all layers; ``axes_step`` is the one axes step
(the cached ``axes.csv`` when it matches, else capture+compute+write): analyze.py runs it with its
plots, and ``stage_axes`` is what the stages that only read the table (pruning) call.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from axes_pipeline.axes.alignment import layer_alignment
from axes_pipeline.axes.graphs import compare_groupings, graph_workers
from axes_pipeline.axes.settings import NOT_IN_IDENTITY, AxesKnobs, CaptureConfig, GraphsConfig, MetricsConfig
from axes_pipeline.capture import (
    POSITIONS,
    Capture,
    capture_activations,
    capture_key,
    check_finite,
    has_patch_moments,
    load_capture,
    patch_dim,
    patch_geometry,
    save_capture,
)
from axes_pipeline.console import progress as units_progress
from axes_pipeline.devices import resolve_device
from axes_pipeline.errors import UserError
from axes_pipeline.layout import AXES_CSV, AXES_FINGERPRINT, LAYERS_CSV
from axes_pipeline.metrics import (
    pairwise_overlap_from_moments,
    pairwise_target_excess_from_moments,
    triplet_ratio_from_moments,
)
from axes_pipeline.metrics.peers import channel_axes_by_peers, check_peers
from axes_pipeline.models import capture_point, conv_norm_pairs, evenly_spaced
from axes_pipeline.runs import Stamp, run_fingerprint, write_csv
from axes_pipeline.tables import DamagedTable, Schema, read_table

log = logging.getLogger("axes_pipeline")

#: the metric knobs passed to channel_axes (every MetricsConfig field but the dtype of the solve)
METRIC_KNOBS = tuple(f.name for f in fields(MetricsConfig) if f.name != "dtype")
#: the capture knobs that change what is captured, read from their schema
CAPTURE_KNOBS = tuple(f.name for f in fields(CaptureConfig) if f.name not in NOT_IN_IDENTITY)

# Schemas of the two tables (tables.Schema), checked whenever they are read. The per-channel
# columns that are defined for every channel must be finite: a NaN there would silently change
# a ranking (a pruning curve, a lesion statistic) instead of failing.
AXES_SCHEMA = Schema(
    "axes.csv",
    columns={"layer": "str", "layer_index": "int", "channel": "int", "input_capture": "float", "peer_overlap": "float",
             "full_explained": "float", "hull_size": "float", "hull_explained": "float", "hull_score": "float",
             "task_info": "float", "target_excess": "float", "task_redundancy": "float", "task_unique": "float",
             "hull_saturated": "bool", "dead": "bool", "l1": "float", "l2": "float", "bn_scale": "float"},
    finite=("input_capture", "peer_overlap", "full_explained", "hull_size", "hull_explained", "hull_score",
            "task_info", "target_excess", "task_redundancy", "task_unique", "l1", "l2"),
    layer="layer")
LAYERS_SCHEMA = Schema(
    "layers.csv",
    columns={"layer": "str", "layer_index": "int", "channels": "int", "dead": "int", "hull_size_mean": "float",
             "hull_saturated_frac": "float", "s3_s2": "float"},
    finite=("hull_size_mean", "hull_saturated_frac"), layer="layer")


def metric_knobs(metrics: MetricsConfig) -> dict:
    """The knobs of :func:`~axes_pipeline.metrics.peers.channel_axes_by_peers` (every metric knob but the dtype)."""
    check_peers(str(metrics.peers))   # a typo fails before any capture
    return {k: getattr(metrics, k) for k in METRIC_KNOBS}


def metric_dtype(metrics: MetricsConfig) -> torch.dtype:
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(metrics.dtype)
    if dtype is None:
        raise UserError(f"metrics.dtype must be float32 or float64, got {metrics.dtype}")
    return dtype


def graph_knobs(graphs: GraphsConfig) -> dict | None:
    """The graph knobs as plain values, None when no graphs are drawn (``graphs.edge_fraction=0``)."""
    return asdict(graphs) if graphs.edge_fraction > 0 else None


def select_units(model: torch.nn.Module, layers) -> dict:
    """{name: ConvUnit} of the analysed layers in forward order; an unknown layer name lists the available ones."""
    units = conv_norm_pairs(model)
    if layers is None:
        return units
    layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [n for n in layers if n not in units]
    if unknown:
        raise UserError(f"unknown layer {unknown[0]!r}; available: {', '.join(units)}")
    return {n: u for n, u in units.items() if n in layers}


def depth_index(model: torch.nn.Module) -> dict[str, int]:
    """Each conv layer's position among all the model's conv layers: the ``layer_index`` of every
    table, whichever subset was analysed (so axes, lesions and dynamics rows line up)."""
    return {n: i for i, n in enumerate(conv_norm_pairs(model))}


def filter_stats(unit) -> dict[str, np.ndarray]:
    """Magnitude baselines per output channel: l1, l2 of the filter and |γ| of the norm after it."""
    w = unit.conv.weight.detach().float().flatten(1)
    gamma = getattr(unit.norm, "weight", None)
    bn = (gamma.detach().float().abs().numpy() if gamma is not None and gamma.numel() == w.shape[0]
          else np.full(w.shape[0], np.nan))
    return {"l1": w.abs().sum(1).numpy(), "l2": w.norm(dim=1).numpy(), "bn_scale": bn}


@dataclass
class LayerResult:
    rows: pd.DataFrame            # one row per channel
    summary: dict                 # one row of layers.csv
    r_x: np.ndarray | None = None  # [C', C'] for plots (C' ≤ graphs.max_channels)
    s: np.ndarray | None = None
    # (future of compare_groupings, C, k, gradient cosines) while a graph worker runs the groupings
    pending: tuple | None = None

    def add_groupings(self, g: dict, C: int, k: int) -> None:
        """Community labels (``-1`` past ``k``) into the rows, graph statistics into the summary."""
        comm_r, comm_s = np.full(C, -1), np.full(C, -1)
        comm_r[:k], comm_s[:k] = g.pop("labels_r"), g.pop("labels_s")
        self.rows["community_r"], self.rows["community_s"] = comm_r, comm_s
        self.summary.update(g)

    def add_gradients(self, grad_cos: dict | None) -> None:
        """The gradient cosines (METHODS §5) per channel and their medians; whitened: the ≈ 0 check,
        on the layers where Σ_X was kept."""
        for key in (k for k in ("cos_euclid", "cos_whitened") if grad_cos and k in grad_cos):
            self.rows[f"grad_{key}"] = grad_cos[key].numpy()
            self.summary[f"grad_{key}_median"] = float(grad_cos[key].abs().median())

    def resolve(self) -> None:
        """Wait for the graphs of this layer, if a worker is computing them, then add what follows
        them (the columns in the serial run's order)."""
        if self.pending is not None:
            future, C, k, grad_cos = self.pending
            self.pending = None
            self.add_groupings(future.result(), C, k)
            self.add_gradients(grad_cos)


def layer_analysis(name: str, index: int, cov: torch.Tensor, unit, *, knobs: dict, dtype: torch.dtype,
                   device: torch.device, graphs: dict | None, n_samples: int, gradients: dict | None = None,
                   seed: int = 0, keep_matrices: bool = False, grad_cos: dict | None = None,
                   graph_pool=None) -> LayerResult:
    """Both axes, alignment, groupings, S3/S2 and gradient cosines of one layer, from the covariance
    ``cov`` ``[C+1, C+1]`` of its channels and the target (:attr:`Capture.moments`) and the capture's
    gradient cosines ``grad_cos``. (From raw samples: ``tests/reference/samples.py``.) With a
    ``graph_pool`` (:func:`~axes_pipeline.axes.graphs.graph_workers`) the groupings are computed there:
    call :meth:`LayerResult.resolve` before reading the result."""
    cov = cov.to(device=device, dtype=dtype)
    arr = {k: v.cpu().numpy() for k, v in channel_axes_by_peers(cov, unit, **knobs).items()}   # metrics.peers
    C = cov.shape[0] - 1
    rows = {"layer": [name] * C, "layer_index": [index] * C, "channel": np.arange(C), **arr, **filter_stats(unit)}
    alive = ~arr["dead"]
    summary = {"layer": name, "layer_index": index, "channels": C,
               "n_samples": int(n_samples), "dead": int(arr["dead"].sum()),
               **layer_alignment(arr),
               "hull_size_mean": float(arr["hull_size"][alive].mean()) if alive.any() else 0.0,
               "hull_saturated_frac": float(arr["hull_saturated"][alive].mean()) if alive.any() else 0.0}
    tri = triplet_ratio_from_moments(cov, pool=knobs["pool"], top=knobs["top"])
    summary.update(s3_s2=float(tri["s3_s2"]), mean_s3=float(tri["mean_s3"]), mean_s2=float(tri["mean_s2"]))
    result = LayerResult(rows=pd.DataFrame(rows), summary=summary)
    grads = grad_cos if gradients is not None else None
    if graphs is not None:
        cap = graphs.get("max_channels")
        k = C if cap is None else min(C, int(cap))   # no cap by default: MobileNetV2 ends at 1280
        sub = cov[: k + 1, : k + 1]
        r_x = pairwise_overlap_from_moments(sub).cpu().double().numpy()
        s = pairwise_target_excess_from_moments(sub).cpu().double().numpy()
        if keep_matrices:
            result.r_x, result.s = r_x, s
        kw = dict(fraction=graphs["edge_fraction"], null_shuffles=graphs["null_shuffles"], seed=seed,
                  null_se=graphs.get("null_se"))
        if graph_pool is not None:   # the groupings and what follows them arrive in resolve()
            result.pending = (graph_pool.submit(compare_groupings, r_x, s, **kw), C, k, grads)
            return result
        result.add_groupings(compare_groupings(r_x, s, **kw), C, k)
    result.add_gradients(grads)
    return result


def analyze_capture(capture: Capture, units: dict, knobs: AxesKnobs, device: torch.device,
                    keep_matrices: bool = False, progress: bool = True, index: dict[str, int] | None = None):
    """Run :func:`layer_analysis` over every captured layer: ``(axes_df, layers_df, results)``. ``index``: each
    layer's ``layer_index`` (:func:`depth_index`); default: capture order."""
    dtype = metric_dtype(knobs.metrics)
    graphs = graph_knobs(knobs.graphs)
    grads = asdict(knobs.gradients) if knobs.gradients.enabled else None
    results = {}
    # the graphs (CPU-bound, single-threaded igraph) run in worker processes beside the other layers' axes
    with graph_workers(len(capture.layers) if graphs else 0) as pool:
        for i, name in enumerate(units_progress(capture.layers, "axes", enabled=progress, label=str)):
            results[name] = layer_analysis(
                name, index[name] if index else i, capture.cov(name), units[name], knobs=metric_knobs(knobs.metrics),
                dtype=dtype, device=device, graphs=graphs, gradients=grads, seed=int(knobs.capture.seed),
                keep_matrices=keep_matrices, grad_cos=capture.gradients.get(name), n_samples=capture.n_samples(name),
                graph_pool=pool)
        for r in results.values():
            r.resolve()
    axes_df = pd.concat([r.rows for r in results.values()], ignore_index=True)
    axes_df["capture_point"] = axes_df["layer"].map({n: capture_point(units[n], str(knobs.capture.point)) for n in results})
    layers_df = pd.DataFrame([r.summary for r in results.values()])
    return axes_df, layers_df, results


def capture_knobs(capture: CaptureConfig, without: tuple[str, ...] = ()) -> dict:
    """``{"capture.<knob>": value}`` of the :data:`CAPTURE_KNOBS` (plain values), less ``without``."""
    c = asdict(capture)
    return {f"capture.{k}": c[k] for k in CAPTURE_KNOBS if k not in without}


def capture_settings(knobs: AxesKnobs) -> dict:
    """The capture knobs that change what is captured; with the data identity and the checkpoint's
    content digest (:func:`capture_identity`) they key the cache. Metric knobs are not in it."""
    c, g = knobs.capture, knobs.gradients
    return {**capture_knobs(c), "gradients": bool(g.enabled) and c.point == "pre_bn",
            "gradients.max_patch_dim": int(g.max_patch_dim), "gradients.sigma_rows": int(g.sigma_rows),
            "gradients.check_layers": g.check_layers, "gradients.check_max_dim": g.check_max_dim,
            "capture.positions": POSITIONS}


def whitened_check_layers(units: dict, settings: dict, point: str) -> list[str] | None:
    """The layers the whitened check runs on (METHODS §5), in forward order; None: every one.

    ``gradients.check_layers`` depth-spaced ones among the layers with patch moments whose patch is
    at most ``gradients.check_max_dim`` wide, and every patch geometry (kernel, stride, padding,
    dilation) of the layers with patch moments at its narrowest layer when none of those has it:
    what the check can catch (a wrong patch extraction, a filter/channel mismatch, a broken solve)
    depends on the geometry, not on the width, while its Σ_X costs D² a row and its solve D³."""
    k = settings["gradients.check_layers"]
    if k is None:
        return None
    if int(k) == 0:
        return []
    dense = [n for n, u in units.items() if has_patch_moments(u, point, settings["gradients.max_patch_dim"])]
    cap = settings["gradients.check_max_dim"]
    picked = set(evenly_spaced([n for n in dense if cap is None or patch_dim(units[n]) <= cap], int(k)))
    covered = {patch_geometry(units[n]) for n in picked}
    for n in sorted(dense, key=lambda n: patch_dim(units[n])):
        if patch_geometry(units[n]) not in covered:
            covered.add(patch_geometry(units[n]))
            picked.add(n)
    return [n for n in dense if n in picked]


def capture_identity(knobs: AxesKnobs, data_id: dict, ckpt: Path) -> dict:
    """What a capture depends on: the data identity (dataset, image size, split seed ...), the
    checkpoint's content digest and the capture knobs (``runs.run_fingerprint``)."""
    return run_fingerprint(data_id, ckpt, **capture_settings(knobs))


def calibration_loader(capture: CaptureConfig, datamodule):
    """The fixed seeded calibration subset of ``capture.*``: the same images for every run, epoch and seed."""
    datamodule.setup("fit")
    cal = datamodule.calibration_set(int(capture.n_cal), seed=int(capture.seed), transform=capture.transform)
    return datamodule.loader(cal, batch_size=int(capture.batch_size))


def get_capture(knobs: AxesKnobs, trained, out_dir: Path, units: dict, device: torch.device,
                progress: bool = True) -> Capture:
    """Captured samples of ``trained`` (its checkpoint, model and data) under these capture knobs: from the
    cache, or one forward pass."""
    identity = capture_identity(knobs, trained.data_id, trained.ckpt)
    settings = capture_settings(knobs)
    c = knobs.capture
    cache = out_dir / "cache" / f"capture-{capture_key(identity)}.pt"
    if c.cache and cache.exists():
        found = load_capture(cache, identity)
        if found is not None:
            log.info("reusing captured activations %s", cache)
            return found
        log.info("captured activations %s are unreadable or from other settings; capturing again", cache)
    capture = capture_activations(
        trained.model, units, calibration_loader(c, trained.datamodule), point=c.point, spatial=c.spatial,
        samples_per_image=int(c.samples_per_image), target=c.target, seed=int(c.seed), patch_moments=settings["gradients"],
        max_patch_dim=settings["gradients.max_patch_dim"], sigma_rows=settings["gradients.sigma_rows"],
        sigma_layers=whitened_check_layers(units, settings, c.point), device=device, progress=progress,
        keep_samples=False)
    trained.model.cpu()
    check_finite(capture)
    if c.cache:
        save_capture(capture, cache, identity)
    return capture


def fit_capture_size(knobs: AxesKnobs, datamodule) -> AxesKnobs:
    """``knobs`` with ``capture.n_cal`` fitted to the training split, checked before the network runs: a
    larger ``capture.n_cal`` means "all of it" (the default 2000 must work on digits' 1,258 training
    images), said in one log line. Every later use and fingerprint must see the number of images
    captured, or prune and analyze would keep replacing each other's tables: hence new knobs, not a note."""
    c = knobs.capture
    datamodule.setup("fit")
    n_train = datamodule.split_sizes()["train"]
    if int(c.n_cal) < 3:
        raise UserError(f"capture.n_cal must be at least 3, got {c.n_cal}")
    if n_train < 3:
        raise UserError(f"the {datamodule.name} training split has only {n_train} images; the axes need at least 3")
    n_cal = min(int(c.n_cal), n_train)
    if n_cal == c.n_cal:
        return knobs
    log.info("capture.n_cal=%s is larger than the %s training split: using all %d training images",
             c.n_cal, datamodule.name, n_cal)
    return replace(knobs, capture=replace(c, n_cal=n_cal))


def axes_identity(knobs: AxesKnobs, layers: list[str] | None = None) -> dict:
    """What a table of the two axes depends on besides the data and the checkpoint: the one place it is
    built. The whole table's (``layers`` None: :func:`axes_step`) is its capture settings (gradients
    included), metric and graph knobs; a table of chosen layers (the dynamics', the definitions', which
    capture no gradients) names those layers instead of ``capture.layers``."""
    metrics = {**{f"metrics.{k}": v for k, v in metric_knobs(knobs.metrics).items()}, "metrics.dtype": knobs.metrics.dtype}
    if layers is None:
        return {**capture_settings(knobs), **metrics, "graphs": graph_knobs(knobs.graphs),
                "gradients.enabled": bool(knobs.gradients.enabled)}
    return {"layers": list(layers), **capture_knobs(knobs.capture, without=("layers",)), "positions": POSITIONS,
            **metrics, "graphs": graph_knobs(knobs.graphs)}


def axes_fingerprint(knobs: AxesKnobs, data_id: dict, ckpt: Path) -> dict:
    """What axes.csv depends on: data identity, checkpoint digest, capture and metric knobs."""
    return run_fingerprint(data_id, ckpt, **axes_identity(knobs))


def axes_stamp(out_dir: Path, want: dict) -> Stamp:
    """The fingerprint file of the axes tables in ``out_dir`` (``axes_fingerprint.json``)."""
    return Stamp(Path(out_dir) / AXES_FINGERPRINT, want)


def stored_axes(out_dir: Path, want: dict, units: dict) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """The stored tables when they were computed under ``want`` (the fingerprint) and pass their
    schemas; None otherwise (a one-line note says why when tables exist but cannot be used)."""
    if not (out_dir / AXES_CSV).is_file():
        return None
    why = axes_stamp(out_dir, want).why_not()
    if why is not None:
        log.info("axes: %s was made with %s; recomputing", out_dir / AXES_CSV, why)
        return None
    per_layer = {n: u.out_channels for n, u in units.items()}   # rows: one per channel, one per layer
    rebuild = "python analyze.py <same overrides>"
    try:
        return (read_table(out_dir / AXES_CSV, AXES_SCHEMA, rebuild=rebuild, rows_per_layer=per_layer),
                read_table(out_dir / LAYERS_CSV, LAYERS_SCHEMA, rebuild=rebuild, rows_per_layer=dict.fromkeys(per_layer, 1)))
    except DamagedTable as err:
        problem = str(err).split("; rebuild")[0]
        log.warning("axes: %s; recomputing it", problem)
        print(f"analyze: note: {problem}; recomputing it")
        return None


@dataclass
class AxesStep:
    """What the axes step returns: the two tables, the capture (None when the tables were read back
    without capturing) and the per-layer results (None when read back)."""

    axes: pd.DataFrame
    layers: pd.DataFrame
    capture: Capture | None = None
    results: dict | None = None

    @property
    def reused(self) -> bool:
        return self.results is None


def axes_step(knobs: AxesKnobs, trained, units: dict, device: torch.device, out_dir: Path, *, reuse: bool = True,
              need_capture: bool = False, keep_matrices: bool = False, progress: bool = True) -> AxesStep:
    """The axes step, the one code that produces ``axes.csv``: the stored tables when they were computed with
    these settings and are sound (and ``reuse``), otherwise captured (or the cached capture), computed and
    written. ``need_capture``: capture (or read the cached capture) even when the tables are reused, for the
    analyses that read it. ``knobs`` must already be fitted to the data (:func:`fit_capture_size`)."""
    capture = get_capture(knobs, trained, out_dir, units, device, progress) if need_capture else None
    want = axes_fingerprint(knobs, trained.data_id, trained.ckpt)
    stored = stored_axes(out_dir, want, units) if reuse else None
    if stored is not None:
        return AxesStep(*stored, capture=capture)
    if capture is None:
        log.info("computing the two axes for %s (no matching analyze/axes.csv)", trained.run_dir)
        capture = get_capture(knobs, trained, out_dir, units, device, progress)
    axes_df, layers_df, results = analyze_capture(capture, units, knobs, device, keep_matrices=keep_matrices,
                                                  progress=progress, index=depth_index(trained.model))
    with axes_stamp(out_dir, want).writing():   # tables from an interrupted write never carry a matching fingerprint
        write_csv(out_dir / AXES_CSV, axes_df)
        write_csv(out_dir / LAYERS_CSV, layers_df)
    return AxesStep(axes_df, layers_df, capture=capture, results=results)


def analyze_dir(trained) -> Path:
    """analyze.py's folder for this checkpoint (``analyze/``, or ``analyze@<stem>/`` for a non-default one)."""
    return trained.stage_dir("analyze")


def load_or_compute_axes(knobs: AxesKnobs, trained, progress: bool = True) -> pd.DataFrame:
    """The per-channel axes table of a trained run, in analyze.py's folder: the stored table when it
    was computed with these settings and is sound, otherwise captured and computed now (and stored)."""
    knobs = fit_capture_size(knobs, trained.datamodule)
    units = select_units(trained.model, knobs.capture.layers)
    return axes_step(knobs, trained, units, resolve_device(knobs.device), analyze_dir(trained), progress=progress).axes


def stage_axes(knobs: AxesKnobs, trained, own_dir: Path, progress: bool = True) -> tuple[pd.DataFrame, Path, dict]:
    """The axes table a later stage (prune) reads, with the folder it came from and its fingerprint:
    analyze.py's table when it was computed under these settings, else the stage's own one in ``own_dir``
    (e.g. ``prune/axes/``), computed there now if needed. analyze.py's table, plots and summary are never
    rewritten under other settings by another stage: they describe each other."""
    knobs = fit_capture_size(knobs, trained.datamodule)
    want = axes_fingerprint(knobs, trained.data_id, trained.ckpt)
    units = select_units(trained.model, knobs.capture.layers)
    found = stored_axes(analyze_dir(trained), want, units)
    if found is not None:
        return found[0], analyze_dir(trained), want
    step = axes_step(knobs, trained, units, resolve_device(knobs.device), Path(own_dir), progress=progress)
    return step.axes, Path(own_dir), want
