"""Ranges of the bounded knobs, declared in the schema beside each default, and the one pass that
checks them right after composition (before Hydra or a stage creates any folder).

OmegaConf's structured configs check types, not ranges, and a dataclass's ``__post_init__`` never
sees a command-line override (OmegaConf merges into its own node, not into the dataclass). So a
bounded field carries its range as field metadata (``seed: int = seed_field(42)``) and
:func:`check_bounds` walks the composed config once, reading every typed node's ranges.
A value that is not a number (``auto``, ``all``, null, an unresolved interpolation) is left to the
stage that interprets it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from axes_pipeline.errors import UserError

#: numpy's legacy seeding (np.random.seed, which Lightning's seed_everything calls) takes [0, 2**32 - 1]
SEED_MAX = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False        # lo itself not allowed (a learning rate of 0)
    hi_open: bool = False
    what: str = ""               # a reason shown with the range ("numpy's seed range")

    def holds(self, x: float) -> bool:
        if math.isnan(x):
            return False
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        return self.hi is None or (x < self.hi or (not self.hi_open and x == self.hi))

    def __str__(self) -> str:
        lo, hi = _num(self.lo), _num(self.hi)
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


def _num(x: float | None) -> str:
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def bounded(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            hi_open: bool = False, what: str = "") -> Any:
    """A dataclass field with ``default`` whose numeric values must lie in the range."""
    return dataclasses.field(default=default, metadata={"range": Range(lo, hi, lo_open, hi_open, what)})


def seed_field(default: int) -> Any:
    return bounded(default, 0, SEED_MAX, what="numpy's seed range")


def count(default: Any, least: int = 1) -> Any:
    """A count: at least ``least`` (1 unless 0 means "none")."""
    return bounded(default, least)


def fraction(default: Any, *, lo_open: bool = False, hi_open: bool = False) -> Any:
    return bounded(default, 0.0, 1.0, lo_open=lo_open, hi_open=hi_open)


def positive(default: Any) -> Any:
    return bounded(default, 0.0, lo_open=True)


def non_negative(default: Any) -> Any:
    return bounded(default, 0.0)


def check_bounds(node, prefix: str = "") -> None:
    """Raise :class:`UserError` (one line) for the first numeric value of the config ``node`` (and the nodes
    below it) outside its schema's range; Hydra's own node (``hydra``) is skipped."""
    ranges = _ranges(OmegaConf.get_type(node))
    for key in node.keys():
        name = f"{prefix}{key}"
        if name == "hydra":
            continue
        try:
            value = node[key]
        except Exception:  # noqa: BLE001 - missing or not resolvable here: the stage reports it
            continue
        if isinstance(value, DictConfig):
            check_bounds(value, f"{name}.")
        elif key in ranges and isinstance(value, int | float) and not isinstance(value, bool):
            rng = ranges[key]
            if not rng.holds(value):
                why = f" ({rng.what})" if rng.what else ""
                raise UserError(f"{name}={value} is out of range: it must be {rng}{why}")


def _ranges(schema) -> dict[str, Range]:
    """{field: range} of a schema and its bases: a subclass that only changes a default
    (``DigitsData.batch_size = 64``) keeps its base's range."""
    ranges: dict[str, Range] = {}
    for cls in reversed(getattr(schema, "__mro__", ())):
        if dataclasses.is_dataclass(cls):
            ranges.update({f.name: f.metadata["range"] for f in dataclasses.fields(cls) if "range" in f.metadata})
    return ranges
