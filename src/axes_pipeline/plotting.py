"""What every figure of the package shares: how it is saved and the colour of each axis.

The analysis, pruning and report figures all save through :func:`save_figure` (one resolution,
written atomically like every other artifact) and colour a score by its axis from :data:`AXIS_COLORS`
/ :data:`AXIS_CMAPS`, so "mixed" is the same colour in ``prune_curves.png`` and in the report.
Matplotlib itself is imported by the modules that draw: this one only names colours and saves.
"""

from __future__ import annotations

from pathlib import Path

from axes_pipeline.runs import atomic_path

__all__ = ["AXIS_CMAPS", "AXIS_COLORS", "DPI", "axis_legend", "save_figure"]

#: Resolution of every PNG the package writes.
DPI = 110

#: One colour per axis a pruning score belongs to, in the order legends list them (a headline
#: marker, a legend); the same hue as the axis's colour map.
AXIS_COLORS = {"local": "tab:blue", "target": "tab:red", "mixed": "tab:purple", "baseline": "tab:gray"}
#: Within an axis every score gets its own shade of the axis's colour map, so a line can be told from
#: the others while the axis still reads at a glance.
AXIS_CMAPS = {"local": "Blues", "target": "Reds", "mixed": "Purples", "baseline": "Greys"}


def axis_legend() -> str:
    """``blue: local, red: target, purple: mixed, gray: baseline`` (a title's key to the colours)."""
    return ", ".join(f"{colour.removeprefix('tab:')}: {axis}" for axis, colour in AXIS_COLORS.items())


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (PNG at :data:`DPI`, cropped to its content) through a temporary file
    renamed into place, then close it (a sweep draws hundreds; open figures would pile up)."""
    # pyplot is loaded already by whoever drew ``fig``; imported here so that importing this module
    # (pruning imports it at startup) does not load matplotlib.
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path
