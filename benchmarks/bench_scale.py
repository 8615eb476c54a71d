"""Paper scale within budget: every stage of analyze and prune on full-width backbones at 32×32,
each against its floor measured in the same run.

    python benchmarks/bench_scale.py [--models resnet18 vgg16 mobilenetv2] [--n-cal 2000]
                                     [--stages axes rest prune] [--prune-images 1000] [--quick]
                                     [--out DIR] [--json PATH]

Per model (random-pixel CIFAR-100-format data written to ``--out``; a 2-batch training run gives
the checkpoints: timing and memory do not depend on training):

- ``axes``: the axes stage as analyze.py runs it (capture of ``--n-cal`` images, then axes,
  graphs with the default 20-draw null, hulls, triplets, gradient cosines), in a child process:
  its wall time, the capture part, the graph part (the time the stage waits for its graph worker
  processes after its own work; CPU seconds include the workers'), and the **floor**: one plain forward pass over
  the same calibration images, timed right before the stage and again right after it, and the mean
  of the two taken (this machine's speed drifts by ±10–20% over minutes: one floor timed before the
  stage alone moved the ratio by as much; both floors are in the JSON). Ratio = axes stage / floor
  (goal ≤ 2.0, issue 22), in wall and in CPU seconds
  (on a shared machine the CPU ratio is the one to trust). Peak RSS of that child
  (goal ≤ 2.5 GB for ResNet-18) and the cache file on disk (goal ≤ 300 MB), next to what the
  old full-sample cache would have held for the same capture.
- ``analyze_rest``: ``analyze.py analysis=all`` on top (lesions limited to
  ``--lesion-channels`` channels on 2 layers so it fits): wall time and peak RSS.
- ``prune``: ``prune.py`` with every score at 3 targets, ``--prune-images`` test images: per
  point the median total time against its evaluation pass (the floor; ratio), wall, peak RSS.
- ``disk``: the run directory after all of it.

``--stages``: which of ``axes``, ``rest`` (analyze_rest), ``prune`` to run (default all).
``--quick``: ResNet-18 only, 400 calibration images, 200 pruning images (a smoke run).
Prints a table and writes everything to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("resnet18", "vgg16", "mobilenetv2")
TARGETS = "[0.7,0.5,0.3]"
STAGES = ("axes", "rest", "prune")


def write_fake_cifar100(root: Path, n_train: int, n_test: int) -> None:
    """CIFAR-100's on-disk format (python pickles, str keys), random pixels."""
    d = root / "cifar-100-python"
    if (d / "meta").exists():
        return
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with open(d / split, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "fine_labels": rng.integers(0, 100, n).tolist(),
                         "coarse_labels": rng.integers(0, 20, n).tolist(),
                         "filenames": [f"{i}.png" for i in range(n)]}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)],
                     "coarse_label_names": [f"s{i}" for i in range(20)]}, f)


def common_overrides(model: str, out: Path) -> list[str]:
    # ~setup: the backbone's own knobs (CIFAR head and strides, random init) that these figures were
    # measured with, not the paper's pair setup (conf/setup/cifar100_<model>.yaml, ImageNet weights)
    return ["data=cifar100", f"data.data_dir={out / 'data'}", "data.verify=false", "data.num_workers=0",
            f"model={model}", "~setup", "name=bench_scale", "logger=none", "callbacks.progress_bar=false",
            f"paths.output_root={out}", "checkpoint.every_epoch=true", "trainer.max_epochs=1"]


def analysis_overrides(n_cal: int, device: str) -> list[str]:
    return [f"capture.n_cal={n_cal}", f"device={device}"]     # analyze/prune only (train.py has no such keys)


def run_child(args: list[str], env: dict | None = None) -> dict:
    """Run a command; its wall time, exit status and peak RSS (the child alone, from wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench_scale: {' '.join(args[:3])} ... failed ({proc.returncode}):\n{out[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3), "stdout": out}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def old_cache_bytes(units: dict, n_samples: int, cfg) -> int:
    """What the pre-lean cache stored for the same capture: float32 samples of every channel plus
    target and image index, and float64 patch moments (sxy, sub_xy [D, C], sxx [D, D], ...)."""
    total = n_samples * 8
    for unit in units.values():
        conv = unit.conv
        C = conv.out_channels
        total += n_samples * C * 4
        D = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        if cfg.gradients.enabled and conv.groups == 1 and D <= int(cfg.gradients.max_patch_dim):
            total += 8 * (2 * D * C + D * D + 4 * D + 2 * C)
    return total


def axes_child(spec: dict) -> dict:
    """The axes stage exactly as analyze.py runs it, timed part by part, plus its floor."""
    import resource

    import torch
    from hydra import compose, initialize_config_dir

    from axes_pipeline.schema import register as register_schemas

    register_schemas()

    import axes_pipeline.axes.table as at
    import axes_pipeline.config  # noqa: F401  (resolvers)
    from axes_pipeline.analyses.analyze import run_analysis
    from axes_pipeline.stage import stage_inputs
    from axes_pipeline.training.restore import restore_trained

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="analyze", overrides=[*spec["overrides"], "analysis=axes", "plots=false",
                                                        "analysis.axes.recompute=true"])
    inputs = stage_inputs(cfg)
    trained = restore_trained(inputs)
    dm = trained.datamodule
    dm.setup("fit")
    c = at.fit_capture_size(inputs.knobs, dm).capture
    device = at.resolve_device(inputs.knobs.device)
    loader = dm.loader(dm.calibration_set(int(c.n_cal), seed=int(c.seed), transform=c.transform),
                       batch_size=int(c.batch_size))
    model = trained.model

    def forward_pass() -> tuple[float, float]:
        """The floor: the same images, one plain forward pass (wall and CPU seconds)."""
        model.to(device).eval()
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            for x, _ in loader:
                model(x.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        out = time.perf_counter() - t0, time.process_time() - c0
        model.cpu()
        return out

    floor_before = forward_pass()
    peak = {"floor": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}

    times = {"capture": 0.0, "graphs": 0.0, "graphs_cpu": 0.0}

    def timed(fn, key):
        def wrapper(*a, **k):
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                times[key] += time.perf_counter() - t
                if f"{key}_cpu" in times:
                    times[f"{key}_cpu"] += time.process_time() - c
        return wrapper

    def capture_then_peak(*a, **k):
        out = a_get_capture(*a, **k)
        peak["capture"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return out

    a_get_capture = at.get_capture
    at.get_capture = timed(capture_then_peak, "capture")
    # the graphs run in worker processes (axes.graphs.graph_workers) beside the other layers' axes:
    # what they add to the stage is the time it then waits for them
    at.LayerResult.resolve = timed(at.LayerResult.resolve, "graphs")
    for stale in (Path(trained.run_dir) / "analyze").glob("cache/capture-*.pt"):
        stale.unlink()        # time a fresh capture, not a cached one
    def children_cpu():   # the graph workers' CPU seconds, once they have exited
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    t0, c0, k0 = time.perf_counter(), time.process_time(), children_cpu()
    run_analysis(cfg)
    stage, stage_cpu = time.perf_counter() - t0, time.process_time() - c0 + children_cpu() - k0
    floor_after = forward_pass()
    floor, floor_cpu = ((a + b) / 2 for a, b in zip(floor_before, floor_after))
    units = at.select_units(trained.model, c.layers)
    cache = sorted((Path(trained.run_dir) / "analyze").glob("cache/capture-*.pt"))
    n = int(c.n_cal) * (1 if c.spatial == "gap" else int(c.samples_per_image))
    return {"floor_s": round(floor, 2), "floor_before_s": round(floor_before[0], 2),
            "floor_after_s": round(floor_after[0], 2), "axes_stage_s": round(stage, 2), "capture_s": round(times["capture"], 2),
            "graphs_s": round(times["graphs"], 2), "ratio_to_floor": round(stage / floor, 2),
            "graphs_share": round(times["graphs"] / stage, 3),
            # CPU seconds of this process: with one torch thread, what the wall times would be on an
            # idle machine (a shared machine stretches the wall times, not these)
            "floor_cpu_s": round(floor_cpu, 2), "axes_stage_cpu_s": round(stage_cpu, 2),
            "ratio_to_floor_cpu": round(stage_cpu / floor_cpu, 2),
            "graphs_share_cpu": round(times["graphs_cpu"] / stage_cpu, 3),
            "cache_mb": round(sum(p.stat().st_size for p in cache) / 1e6, 2),
            "old_cache_mb": round(old_cache_bytes(units, n, cfg) / 1e6, 1),
            "channels": int(sum(u.conv.out_channels for u in units.values())), "layers": len(units),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "peak_rss_after_floor_gb": round(peak["floor"], 3), "peak_rss_after_capture_gb": round(peak["capture"], 3)}


def prune_ratios(run_dir: Path) -> dict:
    pts = [json.loads(p.read_text()) for p in (run_dir / "prune").glob("*/points/*.json")]   # every protocol
    pts = [p for p in pts if "eval_s" in p]
    total = [p["search_s"] + p["prune_s"] + p["fvcore_s"] + p["eval_s"] for p in pts]
    return {"points": len(pts), "point_s": round(float(np.median(total)), 3),
            "eval_s": round(float(np.median([p["eval_s"] for p in pts])), 3),
            "ratio_to_floor": round(float(np.median([t / p["eval_s"] for t, p in zip(total, pts)])), 3)}


def bench_model(model: str, args) -> dict:
    out = Path(args.out)
    ov_train = common_overrides(model, out)
    ov = [*ov_train, *analysis_overrides(args.n_cal, args.device)]
    py = [sys.executable]
    res: dict = {"model": model, "n_cal": args.n_cal, "prune_images": args.prune_images}
    print(f"== {model}: training 2 batches (checkpoints only)", flush=True)
    run_child([*py, "train.py", *ov_train, "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2",
               "+trainer.limit_test_batches=2"])
    if "axes" in args.stages:
        print(f"== {model}: axes stage vs its floor", flush=True)
        child = run_child([*py, __file__, "--_axes-child", json.dumps({"overrides": ov})])
        res["axes"] = json.loads(child["stdout"].strip().splitlines()[-1])
        res["axes"]["child_wall_s"] = child["wall_s"]
        print(f"   {res['axes']}", flush=True)
    if "rest" in args.stages:
        res["analyze_rest"] = analyze_rest(model, ov, args)
    if "prune" in args.stages:
        res["prune"] = prune_stage(model, ov, args)
        res["disk_mb"] = round(dir_bytes(res["prune"].pop("run_dir")) / 1e6, 1)
    return res


def analyze_rest(model: str, ov: list[str], args) -> dict:
    py = [sys.executable]
    print(f"== {model}: analyze.py analysis=all (lesions limited)", flush=True)
    rest = run_child([*py, "analyze.py", *ov, "analysis=all", f"analysis.lesion.channels={args.lesion_channels}",
                      "analysis.lesion.eval_samples=200", "analysis.lesion.taylor_images=128",
                      "analysis.lesion.n_boot=200", "plots=false"] + (
                          [f"analysis.lesion.layers=[{args.lesion_layers}]"] if args.lesion_layers else []))
    out = {k: rest[k] for k in ("wall_s", "peak_rss_gb")}
    print(f"   {out}", flush=True)
    return out


def prune_stage(model: str, ov: list[str], args) -> dict:
    py = [sys.executable]
    out = Path(args.out)
    print(f"== {model}: prune.py, every score at 3 targets", flush=True)
    pr = run_child([*py, "prune.py", *ov, f"pruning.targets={TARGETS}", f"pruning.eval_samples={args.prune_images}",
                    "pruning.latency=false", "pruning.random_draws=1", "plots=false"])
    run_dir = next(p.parent for p in (out / "runs").rglob("prune") if p.is_dir() and model in str(p))
    res = {"wall_s": pr["wall_s"], "peak_rss_gb": pr["peak_rss_gb"], **prune_ratios(run_dir)}
    print(f"   {res}", flush=True)
    return {**res, "run_dir": run_dir}


def lesion_layers_for(model: str) -> str:
    return {"resnet18": "layer1.0.conv1,layer4.1.conv2", "vgg16": "features.0,features.40",
            "mobilenetv2": "features.1.conv.0.0,features.18.0"}.get(model, "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--n-cal", type=int, default=2000)
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--prune-images", type=int, default=1000)
    ap.add_argument("--lesion-channels", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="ResNet-18 only, 400 calibration / 200 pruning images")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="runs/bench_scale")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_axes-child", dest="axes_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.axes_child:
        print(json.dumps(axes_child(json.loads(args.axes_child))))
        return 0
    if args.quick:
        args.models, args.n_cal, args.prune_images = ["resnet18"], 400, 200
    out = Path(args.out).resolve()
    args.out = str(out)
    write_fake_cifar100(out / "data", n_train=max(int(args.n_cal / 0.85) + 100, 1200), n_test=args.prune_images)
    rows = []
    for model in args.models:
        args.lesion_layers = lesion_layers_for(model)
        rows.append(bench_model(model, args))
    print(f"\n{'model':12} {'floor s':>8} {'axes s':>8} {'capture':>8} {'graphs':>7} {'axes/floor':>10} "
          f"{'peak GB':>8} {'cache MB':>9} {'old MB':>8} {'rest s':>7} {'point/eval':>10} {'disk MB':>8}")
    nan = float("nan")
    for r in rows:
        a = r.get("axes", {})
        g = lambda d, k: d.get(k, nan)  # noqa: E731 - a stage not run prints nan
        print(f"{r['model']:12} {g(a, 'floor_s'):8.1f} {g(a, 'axes_stage_s'):8.1f} {g(a, 'capture_s'):8.1f} "
              f"{g(a, 'graphs_s'):7.1f} {g(a, 'ratio_to_floor'):10.2f} {g(a, 'peak_rss_gb'):8.2f} "
              f"{g(a, 'cache_mb'):9.1f} {g(a, 'old_cache_mb'):8.0f} {g(r.get('analyze_rest', {}), 'wall_s'):7.0f} "
              f"{g(r.get('prune', {}), 'ratio_to_floor'):10.2f} {r.get('disk_mb', nan):8.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
