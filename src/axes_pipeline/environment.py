"""The environment that shapes a run's numbers, besides its code, settings and seed.

The same seed trained with another CPU thread count, on another processor or with another torch / BLAS /
oneDNN build gives other weights (float sums in another order; measured: val 0.9611 against 0.9778 on the
demo with one thread against two, and another machine of the same kind moved the headline by 0.06). Training
records :func:`environment` (``<run>/environment.json`` at its first start, ``train_summary.json``
``environment``); a resume or a later stage under another says so in one line (:func:`differs`), and the report
shows each seed's (:func:`label`) with a notice where one group mixes them. It is never part of a run's
identity: another machine may analyse a run, it only says that its numbers are not bit-identical.
"""

from __future__ import annotations

import hashlib
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: the file where a run records the environment it was trained in (at its first start)
ENVIRONMENT_JSON = "environment.json"


def processor() -> str:
    """The processor's model name (``/proc/cpuinfo``'s ``model name``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def build_info(config: str) -> dict:
    """The BLAS and oneDNN of torch's build (``torch.__config__.show()``) in short, and a digest of the whole."""
    blas = re.search(r"BLAS_INFO=([^,\s]+)", config)
    dnn = re.search(r"(MKL-DNN|oneDNN)\s+(v[\d.]+)", config)
    cap = re.search(r"CPU capability usage:\s*(\S+)", config)
    return {"blas": blas.group(1) if blas else None, "onednn": dnn.group(2) if dnn else None,
            "cpu_capability": cap.group(1) if cap else None,
            "build_digest": hashlib.sha256(config.encode()).hexdigest()[:12]}


def environment() -> dict[str, Any]:
    """What shapes this process' numbers: torch's thread count, the processor, torch and its BLAS / oneDNN build,
    the determinism settings and the CUDA device (None on CPU). Plain values, for JSON."""
    import torch

    cuda = torch.cuda.is_available()
    return {"threads": int(torch.get_num_threads()), "processor": processor(), "machine": platform.machine(),
            "torch": torch.__version__, **build_info(torch.__config__.show()),
            "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cuda_device": torch.cuda.get_device_name(0) if cuda else None}


#: the keys that move the numbers of a run trained on a CPU (the determinism settings only matter on a GPU,
#: where cudnn picks its algorithms: there they are compared too)
SHAPING = ("threads", "processor", "machine", "torch", "blas", "onednn", "cpu_capability", "build_digest", "cuda_device")
GPU_SHAPING = ("deterministic_algorithms", "cudnn_deterministic", "cudnn_benchmark")


def differs(recorded: Mapping | None, now: Mapping) -> str | None:
    """One line naming what differs between the ``recorded`` environment and ``now`` (``threads: 2 -> 1``); None
    when they match or nothing was recorded (a run trained before environments were recorded)."""
    if not isinstance(recorded, Mapping) or not recorded:
        return None
    keys = SHAPING + (GPU_SHAPING if recorded.get("cuda_device") or now.get("cuda_device") else ())
    diffs = [f"{k}: {recorded.get(k)} -> {now.get(k)}" for k in keys if recorded.get(k) != now.get(k)]
    return ", ".join(diffs) or None


def label(env: Mapping | None) -> str:
    """A few words for the report: ``Intel Xeon … ×2 threads, torch 2.14.1`` (``(not recorded)`` for an older run)."""
    if not isinstance(env, Mapping) or not env:
        return "(not recorded)"
    device = env.get("cuda_device") or env.get("processor") or "unknown"
    return f"{device} ×{env.get('threads')} threads, torch {env.get('torch')} ({env.get('build_digest')})"
