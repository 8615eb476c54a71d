"""`make demo`: the whole pipeline on the embedded default (scikit-learn digits), offline, on CPU.

A three-seed sweep through every stage, exactly as a user would type it:
  train.py -m → analyze.py -m (all analyses) → prune.py -m (three pruning protocols) → report.py
Each stage resumes: re-running the demo skips what is already complete.

Pruning runs under the backbone's default protocol, ``uniform`` and ``knapsack`` (issue 29: does the answer
depend on the allocation?), each in its own ``prune/<protocol>/``. Latency is timed at batch size 1 only,
once per distinct pruned architecture.

The nine prune jobs (3 seeds × 3 protocols) run two at a time (``hydra/launcher=parallel``, one torch
thread each): a point's fvcore trace, physical pruning and bookkeeping are single-threaded Python, so on
two cores the stage took 354 s against 477 s one job after the other (2026-12-07), with the same curves
and headline to the last digit. Each prune job says in one line that it runs at another thread count than
training did. Train and analyze stay sequential: three seeds on two workers leave the third alone on one
core (measured slower, 73 s and 202 s against 65 s and 173 s), and training at one thread would give
other weights than the documented demo's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEEDS = os.environ.get("DEMO_SEEDS", "42,123,456")
COMMON = ["experiment=demo", f"seed={SEEDS}"]


PRUNE = ["pruning.allocation=auto,uniform,knapsack", "pruning.latency_batch_sizes=[1]", "hydra/launcher=parallel"]
STAGES = [
    ("train", ["train.py", "-m", *COMMON]),
    ("analyze", ["analyze.py", "-m", *COMMON, "analysis=all"]),
    ("prune", ["prune.py", "-m", *COMMON, *PRUNE]),
    ("report", ["report.py", "experiment=demo"]),
]


def main() -> int:
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    t_all = time.perf_counter()
    for name, args in STAGES:
        print(f"\n=== demo: {name}: python {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, *args], cwd=ROOT, env=env)
        print(f"=== demo: {name} took {time.perf_counter() - t0:.0f}s", flush=True)
        if res.returncode != 0:
            print(f"demo: stage {name} failed (exit {res.returncode})", file=sys.stderr)
            return res.returncode
    root = Path(os.environ.get("AXES_OUTPUT_ROOT", ROOT))   # paths.output_root's default
    report = (root if root.is_absolute() else ROOT / root) / "multirun" / "demo" / "report" / "report.html"
    print(f"\ndemo: finished in {time.perf_counter() - t_all:.0f}s; open the report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
