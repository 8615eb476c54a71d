"""Schemas of the tables the stages hand to each other, checked every time one is read.

A table that a later stage reads (``axes.csv``, ``layers.csv``, ``prune_curves.csv`` ...) is
checked against its schema: the columns exist, each holds values of its kind, the float columns
that must be finite are, and (when the reader knows them) each layer has the expected number of
rows. A damaged table raises :class:`DamagedTable`, a :class:`UserError` whose one line names the
file, what is wrong and the command that rebuilds it. A stage that made the table itself catches
it, says so in one log line and recomputes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from axes_pipeline.errors import UserError

KINDS = ("str", "int", "float", "bool")


class DamagedTable(UserError):
    """A table on disk that does not match its schema (missing, truncated, NaN, wrong types)."""


@dataclass(frozen=True)
class Schema:
    """What a table must hold. ``columns`` maps a column to its kind (one of :data:`KINDS`);
    ``finite`` lists the float columns that may hold no NaN/Inf (the others may hold NaN: a
    quantity that is undefined for some rows); ``layer`` names the column that groups rows by layer
    for the per-layer row counts; ``min_rows`` is the fewest rows a complete table has."""

    name: str
    columns: Mapping[str, str]
    finite: tuple[str, ...] = ()
    layer: str | None = None
    min_rows: int = 1
    optional: tuple[str, ...] = field(default=())   # columns that may be absent (older or partial runs)

    def __post_init__(self):
        bad = {c: k for c, k in self.columns.items() if k not in KINDS}
        if bad:
            raise ValueError(f"schema {self.name}: unknown kinds {bad}")


def problems(df: pd.DataFrame, schema: Schema, rows_per_layer: Mapping[str, int] | None = None) -> list[str]:
    """Everything wrong with ``df`` under ``schema`` (empty when it is sound)."""
    out: list[str] = []
    missing = [c for c in schema.columns if c not in df.columns and c not in schema.optional]
    if missing:
        out.append(f"missing column(s) {', '.join(missing)}")
    if len(df) < schema.min_rows:
        out.append(f"{len(df)} row(s), at least {schema.min_rows} expected")
    for col, kind in schema.columns.items():
        if col not in df.columns:
            continue
        s = df[col]
        if kind in ("int", "float"):
            num = pd.to_numeric(s, errors="coerce")
            text = num.isna() & s.notna()
            if text.any():
                out.append(f"column {col} holds non-numeric values (e.g. {s[text].iloc[0]!r})")
                continue
            if kind == "int" and (num.dropna() % 1 != 0).any():
                out.append(f"column {col} holds non-integer values")
            n_bad = int((~np.isfinite(num.to_numpy(dtype=float))).sum())
            if col in schema.finite and n_bad:
                out.append(f"column {col} holds {n_bad} NaN/Inf value(s)")
        elif kind == "bool":
            ok = s.isin([True, False, 0, 1, "True", "False", "true", "false"])
            if not ok.all():
                out.append(f"column {col} holds non-boolean values (e.g. {s[~ok].iloc[0]!r})")
        elif kind == "str" and s.isna().any() and col in schema.finite:
            out.append(f"column {col} has empty entries")
    if rows_per_layer is not None and schema.layer and schema.layer in df.columns:
        have = df.groupby(schema.layer).size().to_dict()
        for layer, n in rows_per_layer.items():
            if have.get(layer, 0) != n:
                out.append(f"layer {layer} has {have.get(layer, 0)} row(s), {n} expected")
                break
        extra = sorted(set(have) - set(rows_per_layer))
        if extra:
            out.append(f"unexpected layer(s) {', '.join(map(str, extra[:3]))}")
    return out


def check_table(df: pd.DataFrame, schema: Schema, *, path: str | Path, rebuild: str,
                rows_per_layer: Mapping[str, int] | None = None) -> pd.DataFrame:
    """``df`` if it matches ``schema``; else :class:`DamagedTable` naming ``path`` and ``rebuild``."""
    found = problems(df, schema, rows_per_layer)
    if found:
        raise DamagedTable(f"{path} is damaged ({'; '.join(found[:3])}); rebuild it with `{rebuild}`")
    return df


def read_table(path: str | Path, schema: Schema, *, rebuild: str,
               rows_per_layer: Mapping[str, int] | None = None) -> pd.DataFrame:
    """Read CSV ``path`` and check it against ``schema`` (see :func:`check_table`)."""
    path = Path(path)
    if not path.is_file():
        raise DamagedTable(f"{path} does not exist; build it with `{rebuild}`")
    try:
        df = pd.read_csv(path)
    except Exception as err:  # noqa: BLE001 - empty, truncated mid-quote, binary: all one answer
        raise DamagedTable(f"{path} cannot be read as CSV ({type(err).__name__}); rebuild it with `{rebuild}`") from None
    return check_table(df, schema, path=path, rebuild=rebuild, rows_per_layer=rows_per_layer)


__all__ = ["DamagedTable", "Schema", "check_table", "problems", "read_table"]
