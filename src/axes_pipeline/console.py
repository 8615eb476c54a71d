"""What a long stage shows on the console while it works."""

from __future__ import annotations

import sys
import time


def progress(items, desc: str, *, total: int | None = None, enabled: bool = True, label=None):
    """Iterate ``items`` showing progress: a tqdm bar when stderr is a terminal, else one line on
    stdout per finished unit (``desc: 3/20 layer4.1.conv2 (12.3s)``) instead of bar redraws."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None
    if not enabled:
        yield from items
        return
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, total=total, leave=False)
        return
    t0 = time.perf_counter()
    of = f"/{total}" if total is not None else ""
    for i, item in enumerate(items, 1):
        yield item
        what = f" {label(item)}" if label is not None else ""
        print(f"{desc}: {i}{of}{what} ({time.perf_counter() - t0:.1f}s)", flush=True)
