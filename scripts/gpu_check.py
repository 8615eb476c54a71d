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
4. **prune.py**: every score, 3 targets, 10,000 test images: per point vs its evaluation pass.

Everything runs through the entry points and functions users run (device moves, autocast,
torch.compile off and on); tests/test_gpu_check.py runs the same functions on CPU at tiny sizes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench_scale():
    """benchmarks/bench_scale.py as a module (fake data, child runner, axes stage vs floor)."""
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "bench_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def synthetic_throughput(device: str, *, width: float = 1.0, batch: int = 256, steps: int = 30,
                         compile: bool = False) -> float:
    """Training images/s of ResNet-18 on random 32×32 tensors already on ``device`` (no data path):
    SGD steps under bf16 autocast with channels-last on CUDA, float32 on CPU."""
    from axes_pipeline.models import build_model

    dev = torch.device(device)
    model = build_model("resnet18", 100, width=width).to(dev)
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


def run_check(out: Path, device: str, *, tiny: bool = False) -> dict:
    """Every stage on ``device``; ``tiny``: test sizes (narrow model, few images, no torch.compile)."""
    bs = _bench_scale()
    py = [sys.executable]
    cuda = device == "cuda"
    n_train, n_test, n_cal, epochs = (700, 120, 200, 1) if tiny else (20000, 10000, 2000, 2)
    width = 0.125 if tiny else 1.0
    bs.write_fake_cifar100(out / "data", n_train=n_train, n_test=n_test)
    ov = ["data=cifar100", f"data.data_dir={out / 'data'}", "data.verify=false", "model=resnet18",
          f"model.width={width}", "logger=none", "callbacks.progress_bar=false", f"paths.output_root={out}",
          f"trainer={'gpu' if cuda else 'cpu'}", f"trainer.max_epochs={epochs}", "checkpoint.every_epoch=true",
          "seed=0"]
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
    report["total_s"] = round(time.perf_counter() - t_all, 1)
    if cuda:
        report["max_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return report


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
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"gpu-check: done in {report['total_s']:.0f}s -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
