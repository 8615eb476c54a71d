"""The family table of docs/usage.md ("Any CNN"): one representative of each torchvision CNN family through
the analysis and pruning stages (:func:`tests.reference.families.check_family`).

    python benchmarks/bench_families.py [--families ResNet DenseNet ...] [--write-readme]

Random weights and random images at the small width and input side of
:data:`~tests.reference.families.REPRESENTATIVES`, CPU. Per family: units analysed
(of all: convs and channels-last ``Linear`` layers, the latter counted in brackets), the
activation points used, propagation pairs linked and layers refused a link, prunable channel
groups (in brackets those rooted in a ``Linear``: ConvNeXt's MLP hidden features), layers kept
whole by the pruning (grouped convs), time for analyze (capture + both axes of every layer;
lesions and propagation are not timed), time for a 3-target FLOPs-matched prune of ``task_info``
(dependency graph, MAC model, search, physical pruning, fvcore check), max |achieved − target|
of the fvcore count, and whether every pruned network runs. ``--write-readme`` replaces the
table between the ``families-table`` markers of docs/usage.md (written to a temporary file, then
renamed).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

import torch

from axes_pipeline.runs import write_text

# the repository root: tests/reference (oracles and harnesses kept out of the package) is imported from there
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.reference.families import REPRESENTATIVES, check_family  # noqa: E402

BEGIN, END = "<!-- families-table:begin -->", "<!-- families-table:end -->"


def row(family: str) -> str:
    arch, width, side = REPRESENTATIVES[family]
    r = check_family(arch, width, side)
    points = ", ".join(f"{k} {v}" for k, v in sorted(r.capture_points.items()))
    if r.prune_error:
        prune = f"refused: {r.prune_error}"
        err, runs, groups = "—", "—", "—"
    else:
        kept = f"; {len(r.prune_refused)} layers kept whole (grouped convs)" if r.prune_refused else ""
        prune = f"{r.prune_s:.1f} s{kept}"
        err, runs = f"{r.max_flops_error:.4f}", "yes" if r.pruned_runs else "NO"
        groups = f"{r.groups}" + (f" ({r.linear_groups} Linear)" if r.linear_groups else "")
    linear = f" ({r.linear_units} Linear)" if r.linear_units else ""
    return (f"| {family} | `{arch}` | {width:g} | {side} | {r.analysed}/{r.layers}{linear} | {points} | "
            f"{r.propagation_pairs} / {len(r.propagation_refused)} | {groups} | {r.analyze_s:.1f} s | {prune} | {err} | "
            f"{runs} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="*", default=list(REPRESENTATIVES), choices=list(REPRESENTATIVES))
    ap.add_argument("--write-readme", action="store_true", help="replace the table in docs/usage.md")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    lines = ["| family | arch | width | input | units analysed | activation point | propagation pairs / "
             "refused | prunable groups | analyze | 3-target prune | max \\|achieved − target\\| | pruned runs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for family in args.families:
        lines.append(row(family))
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    if args.write_readme:
        readme = Path(__file__).resolve().parents[1] / "docs" / "usage.md"
        text = readme.read_text()
        if BEGIN not in text or END not in text:
            raise SystemExit(f"docs/usage.md has no {BEGIN} ... {END} markers")
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        write_text(readme, f"{head}{BEGIN}\n{table}\n{END}{tail}")
        print(f"wrote the table to {readme}")


if __name__ == "__main__":
    main()
