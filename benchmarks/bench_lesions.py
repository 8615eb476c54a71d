"""Lesion throughput: the batched engine vs one channel at a time (zero the weights, evaluate,
restore), same model, data and channels, measured in the same run.

    python benchmarks/bench_lesions.py [--channels 16] [--layers conv1 layer2.0.conv1 ...] [--device cpu]

Model: the demo's ResNet-18 at width 0.25 (random weights, non-trivial BatchNorm statistics) on
the digits test split at 16×16 (359 images). Prints channels lesioned per second of each path,
the ratio, and the largest loss difference between them (they must agree to ~1e-6). Each time
is the best of ``--repeats`` runs, so load from other processes disturbs it less.
``--repeat`` also times the engine's fallback that repeats the input per lesion (no fx cut).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from axes_pipeline.analyses.lesion_engine import LesionEngine, Lesions, materialise, trace
from axes_pipeline.data import DigitsDataModule
from axes_pipeline.models import conv_norm_pairs
from axes_pipeline.models.synthetic import with_bn_statistics

# the repository root: tests/reference (oracles and harnesses kept out of the package) is imported from there
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.reference.lesions import weight_lesion_eval  # noqa: E402

DEFAULT_LAYERS = ["conv1", "layer1.1.conv2", "layer2.0.conv1", "layer3.0.conv2", "layer4.1.conv2"]




def timed(fn, device, repeats: int = 1) -> tuple[object, float]:
    """``fn()`` and its best wall time over ``repeats`` runs (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--channels", type=int, default=16, help="channels lesioned per layer")
    ap.add_argument("--layers", nargs="*", default=DEFAULT_LAYERS)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-rows", type=int, default=None, help="rows per batched pass (default: the engine's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--repeat", action="store_true", help="also time the input-repeating fallback")
    ap.add_argument("--repeats", type=int, default=3, help="timing runs per measurement (best is kept)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    dm = DigitsDataModule(image_size=16)
    dm.setup()
    batches = materialise(dm.loader(dm.eval_subset(None, seed=0), batch_size=args.batch_size), device)
    n_images = sum(len(y) for _, y in batches)
    model = with_bn_statistics("resnet18", args.width).to(device)
    units = conv_norm_pairs(model)
    graph = trace(model)
    print(f"resnet18 width {args.width}, digits 16x16, {n_images} test images, device {device}, "
          f"torch threads {torch.get_num_threads()}")

    # warm-up (allocator, kernels) on a layer that is not timed first
    w = units[args.layers[-1]]
    LesionEngine(model, w, graph=graph).evaluate(batches, Lesions.zero([0], w.conv.out_channels), device)
    weight_lesion_eval(model, w, [0], batches, device)

    header = f"{'layer':<18}{'C':>5}{'lesions':>8}{'loop ch/s':>11}{'batched ch/s':>14}{'ratio':>8}"
    header += f"{'repeat ch/s':>13}" if args.repeat else ""
    print(header + f"{'max |Δloss|':>13}")
    tot = {"loop": 0.0, "batched": 0.0, "repeat": 0.0}
    n_total = 0
    for name in args.layers:
        unit = units[name]
        c = unit.conv.out_channels
        chans = list(np.linspace(0, c - 1, min(args.channels, c)).round().astype(int))
        ref, t_loop = timed(lambda: weight_lesion_eval(model, unit, chans, batches, device), device, args.repeats)
        engine = LesionEngine(model, unit, graph=graph, max_rows=args.max_rows)
        got, t_b = timed(lambda: engine.evaluate(batches, Lesions.zero(chans, c), device), device, args.repeats)
        k = len(chans)
        line = f"{name:<18}{c:>5}{k:>8}{k / t_loop:>11.1f}{k / t_b:>14.1f}{t_loop / t_b:>8.2f}"
        if args.repeat:
            rep = LesionEngine(model, unit, graph=graph, split=False, max_rows=args.max_rows)
            _, t_r = timed(lambda: rep.evaluate(batches, Lesions.zero(chans, c), device), device, args.repeats)
            line += f"{len(chans) / t_r:>13.1f}"
            tot["repeat"] += t_r
        print(line + f"{np.abs(got.loss - ref.loss).max():>13.2e}")
        tot["loop"] += t_loop
        tot["batched"] += t_b
        n_total += len(chans)
    line = (f"{'all':<18}{'':>5}{n_total:>8}{n_total / tot['loop']:>11.1f}{n_total / tot['batched']:>14.1f}"
            f"{tot['loop'] / tot['batched']:>8.2f}")
    if args.repeat:
        line += f"{n_total / tot['repeat']:>13.1f}"
    print(line)
    print(f"batched path: {n_total / tot['batched']:.1f} channels/s, one-at-a-time loop: "
          f"{n_total / tot['loop']:.1f} channels/s, speed-up {tot['loop'] / tot['batched']:.2f}x")


if __name__ == "__main__":
    main()
