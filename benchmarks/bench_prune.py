"""Time per (score, target) pruning point, split into search / pruning / fvcore / evaluation,
and the analytic MAC count against fvcore for the same mask; on the demo, one point's evaluation with
the splits held (as a sweep reads them) against fresh loaders.

    python benchmarks/bench_prune.py [--targets 0.9 0.7 0.5 0.3] [--repeats 3] [--skip-cifar]
                                     [--score-images 128] [--device cpu]

Networks (random weights, non-trivial BatchNorm statistics; timing does not depend on training):

- demo: ResNet-18 at width 0.25 on the digits test split at 16×16 (the demo's data and model);
- cifar: ResNet-18 at width 1, 32×32 inputs, evaluated on ``--eval-batches`` random batches of
  128 images (no dataset needed).

Per point: ``search`` = allocation + FLOPs bisection on the analytic count; ``prune`` =
deepcopy + dependency graph + physical pruning; ``fvcore`` = fvcore count of the pruned net
(the ``achieved_flops`` check); ``eval`` = accuracy on the evaluation set. Times are medians
over the targets of the best of ``--repeats`` runs. Also printed: the one-off costs (groups,
cost model, unpruned fvcore) and the calibration-based scores (taylor, hrank, chip) per image.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from axes_pipeline.models import conv_layers
from axes_pipeline.models.synthetic import with_bn_statistics
from axes_pipeline.pruning import (
    SCORES,
    CostModel,
    ScoreContext,
    build_groups,
    fvcore_macs,
    group_scores,
    keep_masks,
    make_allocation,
    match_flops,
    prune_physically,
)
from axes_pipeline.pruning.evaluate import evaluate


def best(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def bench_network(label: str, model, x, loader, targets, repeats, device, score_images: int, side: int):
    print(f"\n== {label}: {sum(p.numel() for p in model.parameters()):,} params, input {tuple(x.shape)}")
    t_groups, groups = best(lambda: build_groups(model, x), 1)
    t_cost, cost = best(lambda: CostModel.build(model, groups, x), 1)
    t_fv0, _ = best(lambda: fvcore_macs(model, x), repeats)
    print(f"one-off: groups {t_groups:.2f} s ({len(groups)} groups), cost model {t_cost:.2f} s, "
          f"fvcore unpruned {t_fv0:.3f} s, unpruned MACs {cost.total:,}")
    ctx = ScoreContext(model, conv_layers(model), seed=0)
    gs = group_scores(groups, SCORES["l1"](ctx, 0))
    rows = []
    ratios = []
    for t in targets:
        t_search, res = best(lambda: match_flops(make_allocation("global", groups, gs, 0.95), cost, t, 0.005), repeats)
        keep = keep_masks(make_allocation("global", groups, gs, 0.95), res.counts)
        t_prune, (pruned, _) = best(lambda: prune_physically(model, groups, keep, x), repeats)
        t_fv, (fv, _) = best(lambda: fvcore_macs(pruned, x), repeats)
        t_an, an = best(lambda: cost.macs(keep), max(repeats, 20))
        assert an == fv, (an, fv)
        ratios.append(t_fv / t_an)
        t_eval, acc = best(lambda: evaluate(pruned.to(device), loader, device), repeats)
        rows.append((t, res.frac, res.evaluations, t_search, t_prune, t_fv, t_eval, t_an))
        print(f"  target {t:.2f}: achieved {res.frac:.4f} ({res.evaluations} MAC counts{', refined' if res.refined else ''}) "
              f"search {t_search * 1e3:7.2f} ms | prune {t_prune * 1e3:7.1f} ms | fvcore {t_fv * 1e3:7.1f} ms | "
              f"eval {t_eval * 1e3:8.1f} ms ({acc['n']} images) | analytic count {t_an * 1e6:6.1f} us "
              f"= fvcore/{t_fv / t_an:,.0f}")
    med = lambda i: statistics.median(r[i] for r in rows)  # noqa: E731
    total = med(3) + med(4) + med(5) + med(6)
    print(f"median per point: search {med(3) * 1e3:.2f} ms, prune {med(4) * 1e3:.1f} ms, fvcore {med(5) * 1e3:.1f} ms, "
          f"eval {med(6) * 1e3:.1f} ms -> {total:.2f} s/point; analytic MAC count is "
          f"{statistics.median(ratios):,.0f}x faster than fvcore on the same mask")

    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(score_images, 3, side, side, generator=g)
    labels = torch.randint(0, 10, (score_images,), generator=g)
    batches = [(imgs[i:i + 128], labels[i:i + 128]) for i in range(0, score_images, 128)]
    ctx = ScoreContext(model, conv_layers(model), calibration=lambda: batches, seed=0, device=device)
    parts = []
    for name in ("taylor", "hrank", "chip"):
        t_s, _ = best(lambda: SCORES[name](ctx, 0), 1)
        parts.append(f"{name} {t_s:.2f} s ({t_s / score_images * 1e3:.2f} ms/image)")
    print(f"scores on {score_images} calibration images: " + ", ".join(parts))


def bench_held(model, dm, repeats: int, device) -> None:
    """One point's evaluation on both splits as a sweep does it (each split read once per datamodule and held)
    against a fresh loader per point (every image decoded and transformed again): the same numbers, timed."""
    from types import SimpleNamespace

    from axes_pipeline.pruning import evaluate as ev

    settings = SimpleNamespace(eval_samples=None, eval_seed=0)
    held = ev.evaluate_test_val(model, dm, settings, device)   # fills the held splits
    t_held, _ = best(lambda: ev.evaluate_test_val(model, dm, settings, device), repeats)
    cap, ev.HOLD_MAX_BYTES = ev.HOLD_MAX_BYTES, 0   # every split streams
    try:
        t_stream, streamed = best(lambda: ev.evaluate_test_val(model, dm, settings, device), repeats)
    finally:
        ev.HOLD_MAX_BYTES = cap
    assert held == streamed, (held, streamed)
    print(f"evaluation of one point (test {held[0]['n']} + val {held[1]['n']} images): held {t_held * 1e3:.1f} ms "
          f"vs fresh loaders {t_stream * 1e3:.1f} ms (**{t_stream / t_held:.2f}x**), same accuracies")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.7, 0.5, 0.3])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--score-images", type=int, default=128)
    ap.add_argument("--skip-cifar", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}, device {device}")

    from axes_pipeline.data import DigitsDataModule

    dm = DigitsDataModule()
    demo = with_bn_statistics("resnet18", 0.25).to(device)
    x = torch.randn(1, 3, 16, 16, device=device)
    bench_network("demo: digits, ResNet-18 w0.25, 16x16", demo, x, dm.test_dataloader(), args.targets,
                  args.repeats, device, args.score_images, 16)
    bench_held(demo, dm, args.repeats, device)
    if not args.skip_cifar:
        g = torch.Generator().manual_seed(0)
        loader = [(torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g))
                  for _ in range(args.eval_batches)]
        net = with_bn_statistics("resnet18", 1.0).to(device)
        x = torch.randn(1, 3, 32, 32, device=device)
        bench_network(f"CIFAR size: ResNet-18 w1, 32x32, {args.eval_batches} random batches of 128", net, x,
                      loader, args.targets, args.repeats, device, args.score_images, 32)
    print(f"load average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
