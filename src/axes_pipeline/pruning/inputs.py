"""What the scores read besides the network: the analysis table of the axes scores (``analyze/axes.csv``,
checked before any point) and the calibration batches of taylor / hrank / chip."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pandas as pd

from axes_pipeline.axes.settings import AxesKnobs
from axes_pipeline.axes.table import stage_axes
from axes_pipeline.errors import UserError
from axes_pipeline.layout import AXES_CSV, RunId
from axes_pipeline.models.graph import out_channels
from axes_pipeline.pruning.resolved import PruneSettings
from axes_pipeline.pruning.scores import Score
from axes_pipeline.tables import Schema, check_table

__all__ = ["axes_loader", "calibration_batches"]


def _analyze_hint(run_id: RunId) -> str:
    """The analyze command with the user's own overrides (those of this prune run but its pruning knobs),
    else the run's identity."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            over = [o for o in HydraConfig.get().overrides.task if not o.startswith(("pruning.", "stage="))]
            return "python analyze.py " + " ".join(over)
    except Exception:  # noqa: BLE001 - only a hint
        pass
    return run_id.command("analyze")


def axes_loader(knobs: AxesKnobs, run_id: RunId, trained, scores: list[Score], layers: dict):
    """A loader of the run's checked analysis table: analyze.py's cached one for the same overrides,
    or prune's own, computed now with them (:func:`~axes_pipeline.axes.table.stage_axes`)."""
    if scores:
        check_every_layer(knobs.capture.layers, list(layers))
    # one row per channel of every conv layer and finite values in every column the scores read: a NaN
    # would otherwise become the lowest keep value after min-max normalisation and silently move a curve
    cols = sorted(set().union(*(s.columns for s in scores))) if scores else []
    schema = Schema(AXES_CSV, {"layer": "str", "channel": "int", **{c: "float" for c in cols}}, finite=tuple(cols),
                    layer="layer")
    rows_per_layer = {name: out_channels(conv) for name, conv in layers.items()}
    rebuild = f"{_analyze_hint(run_id)} analysis.axes.recompute=true"

    def checked(table: pd.DataFrame, path: Path) -> pd.DataFrame:
        # only the pruned convs are checked: a table may hold more layers than prune reads
        part = table[table["layer"].isin(list(rows_per_layer))] if "layer" in table else table
        return check_table(part, schema, path=path, rebuild=rebuild, rows_per_layer=rows_per_layer)

    def load():
        # the one axes step (axes.table): analyze.py's table when its fingerprint matches, else prune's
        # own (prune/axes/), computed now if needed; analyze.py's table, plots and summary are never
        # rewritten under other settings. Any failure is a bug or a user mistake to see, never a stale
        # table read instead.
        table, folder, fp = stage_axes(knobs, trained, trained.stage_dir("prune") / "axes")
        load.source.update(folder=folder, fingerprint=fp)
        return checked(table, folder / AXES_CSV)

    # where the table came from (analyze's folder, or prune's own prune/axes/) and its fingerprint, once loaded
    load.source = {}
    return load


def check_every_layer(chosen, prunable: list[str]) -> None:
    """One line, before any work, when ``capture.layers`` leaves out some of the ``prunable`` convs: the axes
    scores rank the channels of every prunable layer, so prune needs the axes of all of them. The cure is to
    drop the knob from the prune command; nothing is recomputed (analyze.py with it would overwrite the
    run's full axes.csv with the chosen layers only)."""
    if chosen is None:
        return
    chosen = [chosen] if isinstance(chosen, str) else list(chosen)
    left_out = [n for n in prunable if n not in chosen]
    if left_out:
        raise UserError(f"prune needs the axes of every prunable layer ({len(prunable)} convs), but capture.layers="
                        f"{','.join(map(str, chosen))} selects {len(prunable) - len(left_out)} of them (it leaves out "
                        f"{left_out[0]}{f' and {len(left_out) - 1} more' if len(left_out) > 1 else ''}); "
                        f"run prune.py without capture.layers")


def calibration_batches(dm, settings: PruneSettings, which: str = "n"):
    """A loader of the calibration batches (built once, on first use, then reused by every score);
    ``which="feature_maps"``: the hrank / chip set (``calibration.n_feature_maps`` images when set)."""
    n = settings.calibration["n"]
    if which == "feature_maps" and settings.calibration.get("n_feature_maps"):
        n = int(settings.calibration["n_feature_maps"])

    @cache
    def batches():
        ds = dm.calibration_set(n, settings.calibration["seed"], transform=settings.calibration["transform"])
        return list(dm.loader(ds, batch_size=settings.calibration["batch_size"]))
    return batches
