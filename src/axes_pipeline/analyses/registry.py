"""The analyses of analyze.py after the axes: a registry filled by a decorator, as the pruning scores.

Each analysis module declares ``@analysis("lesion", check=check_lesion_analysis)`` on its run function
``fn(ctx, block) -> dict`` of headline figures, where ``block`` is its own knobs (``analysis.<name>``, as its
schema's dataclass); ``check(ctx, block)`` validates them before the network runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Analysis:
    name: str
    run: Callable                  # (ctx, block) -> dict of headline figures
    check: Callable | None = None  # (ctx, block) -> None, raises UserError; None: nothing to check up front
    needs_run: bool = True         # false: works without a trained run (the synthetic study)


ANALYSES: dict[str, Analysis] = {}


def analysis(name: str, check: Callable | None = None, needs_run: bool = True):
    """Decorator: register ``fn(ctx, block) -> dict`` as analysis ``name`` (``analysis=<name>``)."""

    def deco(fn: Callable) -> Callable:
        ANALYSES[name] = Analysis(name, fn, check, needs_run)
        return fn

    return deco
