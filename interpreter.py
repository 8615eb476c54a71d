"""The first import of every entry point (train.py, analyze.py, prune.py, report.py): stop in one line when
this interpreter lacks the project's packages (``python3 train.py`` outside the project's environment)
instead of a ``ModuleNotFoundError`` traceback. It imports nothing outside the standard library, so it
runs under any Python 3, and only looks the packages up (no import: torch is seconds)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

#: what every entry point imports before its stage runs (the package last: it may be missing alone)
NEEDED = ("omegaconf", "hydra", "torch", "lightning", "axes_pipeline")


def missing(names: tuple[str, ...] = NEEDED) -> list[str]:
    """The packages of ``names`` that this interpreter cannot import."""
    out = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def require_project_env() -> None:
    """Exit with status 2 and one line naming the missing packages, this interpreter and the cure."""
    lacking = missing()
    if not lacking:
        return
    script = Path(sys.argv[0]).name or "train.py"
    print(f"error: {sys.executable} cannot import {', '.join(lacking)} (the project's packages); install them "
          f"once with `make install`, then run `.venv/bin/python {script} ...` (or activate .venv first)",
          file=sys.stderr)
    sys.exit(2)


require_project_env()
