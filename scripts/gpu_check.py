"""`make gpu-check`: the whole pipeline on one GPU in under 8 minutes, one JSON of what it measured.

    python scripts/gpu_check.py [--out runs/gpu_check] [--json gpu_check.json]

On a machine without CUDA it says so in one line and exits 2. On a GPU, with random-pixel
CIFAR-100-format data (written under ``--out``):

1. **synthetic ceiling**: ResNet-18 (width 1, 32×32) training steps on random tensors already on
   the GPU, bf16 autocast, channels-last: the images/s the data path can at best reach;
2. **train.py** ``trainer=gpu`` (bf16-mixed, channels-last) three times: ``data.on_device=true``,
   the DataLoader path (``data.on_device=false``), and ``data.on_device=true train.compile=true``
   (torch.compile on): images/s of each and their ratios to the ceiling;
3. **the axes stage against its floor** (capture vs one forward pass, benchmarks/bench_scale.py's
   ``axes_child``), then **analyze.py analysis=all** (lesions, propagation, dynamics on the GPU);
4. **prune.py**: every score, 3 targets, 10,000 test images: per point vs its evaluation pass;
5. **report.py** on that run;
6. **the paper's headline suite predicted** on this device (:func:`predict_suite`): the three
   CIFAR-100 experiments × the five seeds of METHODS §10 (training, ``analysis=all``, the full prune
   sweep, one report) from the throughputs measured above, next to the 3 GPU-hour target; and what
   the recovery options would add (:func:`predict_protocols`: the iterative schedule, scratch training).

Everything runs through the entry points and functions users run (device moves, autocast,
torch.compile off and on); tests/test_gpu_check.py runs the same functions on CPU at tiny sizes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from axes_pipeline.runs import write_json

ROOT = Path(__file__).resolve().parents[1]


def _bench_scale():
    """benchmarks/bench_scale.py as a module (fake data, child runner, axes stage vs floor)."""
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "bench_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def synthetic_throughput(device: str, *, width: float = 1.0, batch: int = 256, steps: int = 30,
                         compile: bool = False, model: str = "resnet18", **knobs) -> float:
    """Training images/s of backbone ``model`` (its ``knobs``: head, strides) on random 32×32 tensors
    already on ``device`` (no data path): SGD steps under bf16 autocast with channels-last on CUDA,
    float32 on CPU. Random init: weights do not change the time of a step."""
    from axes_pipeline.models import build_model

    dev = torch.device(device)
    model = build_model(model, 100, width=width, **knobs).to(dev)
    cuda = dev.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (batch,), device=dev)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(step_model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):   # warm-up: kernels, allocator, compilation
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def train_run(bs, py: list[str], ov: list[str], name: str, *extra: str) -> dict:
    """train.py with ``extra`` overrides under its own experiment name: images/s, wall, peak RSS."""
    res = bs.run_child([*py, "train.py", *ov, f"name={name}", *extra])
    summary = next(Path(ov_value(ov, "paths.output_root")).glob(f"runs/{name}/*/*/train_summary.json"))
    s = json.loads(summary.read_text())
    return {"images_per_s": s["train_images_per_s"], "wall_s": res["wall_s"], "peak_rss_gb": res["peak_rss_gb"],
            "val_acc": s["val_acc"], "device": s["device"]}


def ov_value(ov: list[str], key: str) -> str:
    return next(o.split("=", 1)[1] for o in ov if o.startswith(f"{key}="))


#: The paper's headline suite (METHODS §10) and the budget it should fit on one GPU (issue 22).
HEADLINE_EXPERIMENTS = ("cifar100_resnet18", "cifar100_vgg16", "cifar100_mobilenetv2")
HEADLINE_SEEDS = (42, 123, 456, 789, 1011)
TARGET_GPU_HOURS = 3.0
#: An evaluation image costs about a third of a training image (a forward pass; the backward pass
#: is about two more), so validation and test images are counted at a third of the training time.
EVAL_COST = 1 / 3
# the model keys that only choose weights or the recipe: everything else is an architecture knob
_NOT_KNOBS = ("_target_", "_partial_", "name", "width", "pretrained", "weights", "recipe", "from_scratch")


@dataclass(frozen=True)
class SuiteRun:
    """The work of one headline experiment per seed, read from its composed config."""

    experiment: str
    model: str
    knobs: dict          # architecture knobs of the paper's setup (VGG's head, MobileNetV2's strides)
    seeds: int
    epochs: int
    train_images: int    # per epoch
    eval_images: int     # per run: validation every epoch + the test split once
    prune_points: int    # scores (random: each draw) × targets of the full sweep


def headline_suite() -> list[SuiteRun]:
    """:class:`SuiteRun` of each headline experiment, from the real configs (composed, nothing built)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from axes_pipeline.pruning.scores import DEFAULT_SCORES
    from axes_pipeline.schema import register as register_schemas

    register_schemas()
    n_fit, n_test = 50_000, 10_000          # CIFAR-100's training and test splits
    runs = []
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for exp in HEADLINE_EXPERIMENTS:
            cfg = compose(config_name="prune", overrides=[f"experiment={exp}"])
            model = OmegaConf.to_container(cfg.model, resolve=True)
            pr = cfg.pruning
            scores = list(DEFAULT_SCORES) if pr.scores in (None, "all") else list(pr.scores)
            draws = pr.random_draws if "random" in scores else 1
            n_val = round(n_fit * cfg.data.val_fraction)
            runs.append(SuiteRun(experiment=exp, model=model["name"], seeds=len(HEADLINE_SEEDS),
                                 knobs={k: v for k, v in model.items() if k not in _NOT_KNOBS},
                                 epochs=int(cfg.trainer.max_epochs), train_images=n_fit - n_val,
                                 eval_images=int(cfg.trainer.max_epochs) * n_val + n_test,
                                 prune_points=(len(scores) + draws - 1) * len(pr.targets)))
    return runs


def predict_suite(runs: list[SuiteRun], *, train_images_per_s: float, speed: dict[str, float], analyze_s: float,
                  prune_fixed_s: float, prune_point_s: float, report_s_per_run: float,
                  target_gpu_hours: float = TARGET_GPU_HOURS) -> dict:
    """Predicted wall time of ``runs`` on one device, from what was measured there on the reference
    backbone (ResNet-18, one seed): ``train_images_per_s`` through train.py, ``analyze_s`` of
    ``analysis=all``, the prune sweep as ``prune_fixed_s`` + ``prune_point_s`` per point, and
    ``report_s_per_run``. ``speed[model]``: the backbone's training images/s over the reference's
    (synthetic steps, same device); every stage of a backbone is taken to cost in proportion to its
    per-image compute, i.e. the reference's time / ``speed``. Seconds per stage, hours in total."""
    rows = []
    for r in runs:
        f = speed[r.model]
        train = (r.epochs * r.train_images + r.eval_images * EVAL_COST) / (train_images_per_s * f)
        analyze = analyze_s / f
        prune = (prune_fixed_s + r.prune_points * prune_point_s) / f
        per_seed = train + analyze + prune
        rows.append({"experiment": r.experiment, "model": r.model, "seeds": r.seeds, "train_s": train,
                     "analyze_s": analyze, "prune_s": prune, "per_seed_s": per_seed, "total_s": per_seed * r.seeds})
    report = report_s_per_run * sum(r.seeds for r in runs)
    total_h = (sum(row["total_s"] for row in rows) + report) / 3600
    return {"rows": rows, "report_s": report, "total_gpu_hours": total_h, "target_gpu_hours": target_gpu_hours,
            "within_target": total_h <= target_gpu_hours}


#: What the recovery protocols add (issue 30, METHODS §9), predicted from the measurements above.
#: An iterative point (3 steps, the scores measured again on the pruned network before steps 2 and 3:
#: the axes re-captured, Taylor recomputed, the groups and MAC model rebuilt) costs this many one-shot
#: points (whose scores are computed once per run, outside the points): measured on the demo (ITERATIVE_DEMO:
#: 34.1 s against 0.8 s a point, CPU). Its re-scoring is forward passes over the calibration images and
#: the axes' linear algebra, a one-shot point's cost its evaluation's forward passes, so the ratio is
#: taken to hold on a GPU; it is a rough figure (a demo point evaluates only 359 test images).
ITERATIVE_POINT_COST = 43.0
ITERATIVE_DEMO = ("2026-12-07, experiment=demo seed=42 (CPU, 2 shared cores), scores input_capture, task_info, "
                  "taylor, l1, random; targets 0.7, 0.4")
#: scratch training (pruning.scratch=true): best local, best target and random at three targets, each a
#: training run of the run's recipe on the pruned network, taken to cost in proportion to the MACs it keeps
SCRATCH_SCORES = 3
SCRATCH_TARGETS = (0.7, 0.5, 0.3)


def predict_protocols(runs: list[SuiteRun], pred: dict, *, prune_point_s: float, speed: dict[str, float]) -> dict:
    """Seconds per seed and hours in all that ``pruning.schedule=iterative`` (a second prune sweep of the
    same points) and ``pruning.scratch=true`` add to the suite of :func:`predict_suite`'s ``pred``."""
    rows = []
    for r, row in zip(runs, pred["rows"]):
        iterative = r.prune_points * prune_point_s * ITERATIVE_POINT_COST / speed[r.model]
        scratch = SCRATCH_SCORES * sum(SCRATCH_TARGETS) * row["train_s"]
        rows.append({"experiment": r.experiment, "seeds": r.seeds, "iterative_s": iterative, "scratch_s": scratch})
    return {"rows": rows, "iterative_gpu_hours": sum(x["iterative_s"] * x["seeds"] for x in rows) / 3600,
            "scratch_gpu_hours": sum(x["scratch_s"] * x["seeds"] for x in rows) / 3600}


def protocols_table(protocols: dict) -> str:
    """:func:`predict_protocols` as a printed table (hours, all seeds)."""
    h = 1 / 3600
    lines = [f"{'adds (issue 30)':<24}{'seeds':>6}{'iterative h':>13}{'scratch h':>11}"]
    for r in protocols["rows"]:
        lines.append(f"{r['experiment']:<24}{r['seeds']:>6}{r['iterative_s'] * r['seeds'] * h:>13.2f}"
                     f"{r['scratch_s'] * r['seeds'] * h:>11.2f}")
    lines.append(f"{'in all':<24}{'':>6}{protocols['iterative_gpu_hours']:>13.2f}{protocols['scratch_gpu_hours']:>11.2f}")
    return "\n".join(lines)


def prediction_table(pred: dict) -> str:
    """The prediction as one printed table (hours)."""
    h = 1 / 3600
    lines = [f"{'experiment':<24}{'seeds':>6}{'train h':>10}{'analyze h':>11}{'prune h':>10}{'total h':>10}"]
    for r in pred["rows"]:
        lines.append(f"{r['experiment']:<24}{r['seeds']:>6}{r['train_s'] * r['seeds'] * h:>10.2f}"
                     f"{r['analyze_s'] * r['seeds'] * h:>11.2f}{r['prune_s'] * r['seeds'] * h:>10.2f}{r['total_s'] * h:>10.2f}")
    lines.append(f"{'report':<24}{'':>6}{'':>10}{'':>11}{'':>10}{pred['report_s'] * h:>10.2f}")
    verdict = "within" if pred["within_target"] else "OVER"
    lines.append(f"{'headline suite':<24}{'':>6}{'':>10}{'':>11}{'':>10}{pred['total_gpu_hours']:>10.2f}"
                 f"   (target {pred['target_gpu_hours']:g} GPU-hours: {verdict})")
    return "\n".join(lines)


def run_check(out: Path, device: str, *, tiny: bool = False) -> dict:
    """Every stage on ``device``; ``tiny``: test sizes (narrow model, few images, no torch.compile)."""
    bs = _bench_scale()
    py = [sys.executable]
    cuda = device == "cuda"
    n_train, n_test, n_cal, epochs = (700, 120, 200, 1) if tiny else (20000, 10000, 2000, 2)
    width = 0.125 if tiny else 1.0
    bs.write_fake_cifar100(out / "data", n_train=n_train, n_test=n_test)
    ov = ["data=cifar100", f"data.data_dir={out / 'data'}", "data.verify=false", "model=resnet18",
          f"model.width={width}", "model.pretrained=false",   # no network here; weights do not change timings
          "logger=none", "callbacks.progress_bar=false", f"paths.output_root={out}",
          f"trainer={'gpu' if cuda else 'cpu'}", f"trainer.max_epochs={epochs}", "checkpoint.every_epoch=true", "seed=0"]
    ana = [f"capture.n_cal={n_cal}", f"device={device}"]     # analyze/prune keys (train.py has none)
    report: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                    "sizes": {"train_images": n_train, "test_images": n_test, "n_cal": n_cal, "epochs": epochs,
                              "width": width}}
    t_all = time.perf_counter()

    t = time.perf_counter()
    report["synthetic"] = {"images_per_s": round(synthetic_throughput(device, width=width,
                                                                       batch=32 if tiny else 256,
                                                                       steps=3 if tiny else 30), 1)}
    if not tiny:
        report["synthetic"]["compiled_images_per_s"] = round(synthetic_throughput(device, compile=True), 1)
    report["synthetic"]["wall_s"] = round(time.perf_counter() - t, 2)

    runs = {"on_device": ("data.on_device=true",), "dataloader": ("data.on_device=false",)}
    if not tiny:     # torch.compile on a CPU test run would take minutes of inductor compilation
        runs["on_device_compiled"] = ("data.on_device=true", "train.compile=true")
    report["train"] = {k: train_run(bs, py, ov, f"gpu_check_{k}", *extra) for k, extra in runs.items()}
    ceiling = report["synthetic"]["images_per_s"]
    for _k, r in report["train"].items():
        r["ratio_to_synthetic"] = round(r["images_per_s"] / ceiling, 3) if r["images_per_s"] else None
    tr = report["train"]
    if tr["dataloader"]["images_per_s"]:
        report["on_device_over_dataloader"] = round(tr["on_device"]["images_per_s"] / tr["dataloader"]["images_per_s"], 2)

    run_ov = [*ov, *ana, "name=gpu_check_on_device"]   # the run trained on the on-device path
    child = bs.run_child([*py, str(ROOT / "benchmarks" / "bench_scale.py"), "--_axes-child",
                          json.dumps({"overrides": run_ov})])
    report["axes"] = json.loads(child["stdout"].strip().splitlines()[-1])
    lesion = ["analysis.lesion.channels=2", "analysis.lesion.eval_samples=100", "analysis.lesion.taylor_images=64",
              "analysis.lesion.n_boot=100", "analysis.lesion.layers=[layer1.0.conv1,layer4.1.conv2]"] if tiny else \
        ["analysis.lesion.channels=16", "analysis.lesion.eval_samples=2000"]
    res = bs.run_child([*py, "analyze.py", *run_ov, "analysis=all", *lesion])
    report["analyze_all"] = {"wall_s": res["wall_s"], "peak_rss_gb": res["peak_rss_gb"]}

    prune = [f"pruning.targets={bs.TARGETS}", f"pruning.eval_samples={n_test}", "pruning.latency_batch_sizes=[1]",
             "pruning.latency_repeats=3", "pruning.random_draws=1"]
    if tiny:
        prune += ["pruning.scores=[l1,input_capture,taylor]", "pruning.targets=[0.5]", "pruning.latency=false",
                  "pruning.calibration.n=64"]
    res = bs.run_child([*py, "prune.py", *run_ov, *prune])
    run_dir = next(p.parent for p in (out / "runs" / "gpu_check_on_device").rglob("prune") if p.is_dir())
    report["prune"] = {"wall_s": res["wall_s"], "peak_rss_gb": res["peak_rss_gb"], **bs.prune_ratios(run_dir)}
    res = bs.run_child([*py, "report.py", *ov, "name=gpu_check_on_device", f"report.out={out / 'report'}"])
    report["report"] = {"wall_s": res["wall_s"], "peak_rss_gb": res["peak_rss_gb"]}
    report["prediction"] = headline_prediction(report, device, width=width, tiny=tiny)
    report["total_s"] = round(time.perf_counter() - t_all, 1)
    if cuda:
        report["max_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return report


def headline_prediction(report: dict, device: str, *, width: float, tiny: bool) -> dict:
    """:func:`predict_suite` from this check's measurements; each headline backbone's speed is its
    synthetic training throughput over ResNet-18's, measured here in its paper setup (at ``width``:
    at tiny sizes the prediction is that of the narrow networks)."""
    runs = headline_suite()
    steps = dict(batch=32, steps=3) if tiny else dict(batch=256, steps=30)
    synth = {r.model: synthetic_throughput(device, width=width, model=r.model, **r.knobs, **steps) for r in runs}
    ref = synth["resnet18"]
    pr = report["prune"]
    measured = {"train_images_per_s": report["train"]["on_device"]["images_per_s"],
                "speed": {m: v / ref for m, v in synth.items()}, "analyze_s": report["analyze_all"]["wall_s"],
                "prune_fixed_s": max(0.0, pr["wall_s"] - pr["points"] * pr["point_s"]), "prune_point_s": pr["point_s"],
                "report_s_per_run": report["report"]["wall_s"]}
    pred = predict_suite(runs, **measured)
    # not in the headline's total: the recovery protocols are options (METHODS §9)
    protocols = predict_protocols(runs, pred, prune_point_s=measured["prune_point_s"], speed=measured["speed"])
    return {"measured": measured, "suite": [asdict(r) for r in runs], **pred, "table": prediction_table(pred),
            "protocols": protocols, "protocols_table": protocols_table(protocols)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--json", default="gpu_check.json")
    ap.add_argument("--cpu-tiny", action="store_true", help=argparse.SUPPRESS)   # the tests' CPU run
    args = ap.parse_args(argv)
    if not args.cpu_tiny and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible on this machine (torch.cuda.is_available() is False); "
              "run `make gpu-check` where nvidia-smi lists one", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    report = run_check(out, "cpu" if args.cpu_tiny else "cuda", tiny=args.cpu_tiny)
    write_json(args.json, report)
    print(json.dumps(report, indent=2))
    print(report["prediction"]["table"])
    print(report["prediction"]["protocols_table"])
    print(f"gpu-check: done in {report['total_s']:.0f}s -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
