"""GPU readiness without a GPU (issue 22, item 2): the device-sensitive stages run on fake CUDA tensors.

The installed torch is a CUDA build on a machine without a GPU. ``FakeTensorMode`` still creates
``device="cuda"`` tensors (no storage) and propagates shapes and devices through every kernel's meta
function, raising when one op mixes ``cuda:0`` and ``cpu`` tensors, exactly where a real GPU would.
So a stage run under it with ``device="cuda"`` shows that every tensor it creates lands on the model's
device, and that what must leave it (``.cpu()`` before ``.numpy()``) is moved explicitly.

What a fake tensor cannot do is give a value (``.item()``, ``bool(t)``, ``.tolist()``, ``.numpy()``) or a
value-dependent shape (``nonzero``, boolean indexing). The stages here need both (finiteness checks,
counts, lesion masks), so :func:`on_fake_cuda` runs each stage twice: first for real on the CPU,
recording every value-dependent answer in order with the line that asked, then on fake CUDA, where those
answers are replayed (same inputs, same seeds: the same control flow, the same questions from the same
lines; a different question stops the test as a desync, and only a library's CPU-only check, such as
``one_hot``'s class range, may go unasked). Everything else in the fake pass, the device checks included,
is torch's own. What even this cannot reach (a tensor made on the CPU that never meets a device tensor in
these small runs) is covered by the device-placement audit at the end: an AST scan of the same modules
for ``torch.*`` factory calls without ``device=``.

Not reachable this way: a backward pass (autograd's engine asks the CUDA driver for a context first,
"hasPrimaryContext expects a valid device index"), so training steps and the fine-tune are checked up
to the loss.
"""

from __future__ import annotations

import ast
import copy
import functools
import os
import sys
import tempfile
import textwrap
import traceback
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import axes_pipeline
from axes_pipeline.analyses.lesion_engine import EvalResult, LesionEngine, Lesions, peer_regression, standardised
from axes_pipeline.analyses.lesions import lesion_layer
from axes_pipeline.capture.activations import capture_activations
from axes_pipeline.data.device_loader import DeviceBatchLoader
from axes_pipeline.metrics import moments as moments_module
from axes_pipeline.metrics.axes import AXES_KEYS, channel_axes, channel_axes_from_moments
from axes_pipeline.metrics.gaussian import covariance
from axes_pipeline.metrics.gradients import PatchMoments, gradient_cosines
from axes_pipeline.metrics.moments import ActivationMoments, Moments, chan_reduce
from axes_pipeline.metrics.peers import channel_axes_by_peers
from axes_pipeline.models.graph import trace
from axes_pipeline.models.layers import conv_norm_pairs
from axes_pipeline.models.synthetic import with_bn_statistics
from axes_pipeline.pruning.evaluate import evaluate
from axes_pipeline.training.module import ClassifierModule

# FakeTensor's own deprecation notice when torchmetrics deep-copies a (fake) metric state
pytestmark = pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")

aten = torch.ops.aten
_SCALAR = aten._local_scalar_dense.default          # .item(), bool(t), int(t), float(t), .tolist()
#: Ops whose output shape depends on values; the fake pass takes the real pass's shapes.
_SHAPED = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
           aten.unique_consecutive.default}


def _bool_index(func, args) -> bool:
    return func is aten.index.Tensor and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])


SRC = Path(axes_pipeline.__file__).resolve().parent     # the package under test, wherever it is imported from
_HERE, _SRC = str(Path(__file__).resolve()), str(SRC)
#: Frames between a question and its asker that ask nothing themselves (this harness, torch's wrappers).
_PASS_THROUGH = ("__torch_dispatch__", "take", "method", "inner", "_fn")


def _asker() -> tuple[tuple[str, int] | None, bool]:
    """``(site, by_library)`` of a value-dependent question: ``site`` the innermost line of the project
    or of a test's stage that led to it; ``by_library`` when a library (torch, torchmetrics) asked it on
    the way, not that line itself. A library may ask on the CPU what it skips on CUDA (``one_hot`` checks
    its classes on the CPU only), so only the project's own questions must repeat one for one."""
    frame, by_library = sys._getframe(2), False
    while frame is not None:
        name, func = frame.f_code.co_filename, frame.f_code.co_name
        if name.startswith(_SRC) or (name == _HERE and func not in _PASS_THROUGH):
            return (name, frame.f_lineno), by_library
        if func not in _PASS_THROUGH:
            by_library = True
        frame = frame.f_back
    return None, by_library


class _Record(TorchDispatchMode):
    """The real pass: note every value-dependent answer, in order, with who asked."""

    def __init__(self, log: list):
        super().__init__()
        self.log = log
        self.muted = 0      # inside a recorded numpy()/tolist(): its inner ops are not questions of the stage

    def note(self, what, answer) -> None:
        self.log.append((what, *_asker(), answer))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.muted:
            pass
        elif func is _SCALAR:
            self.note(func, out)
        elif func in _SHAPED or _bool_index(func, args):
            outs = out if isinstance(out, tuple) else (out,)
            self.note(func, [(o.shape, o.dtype) for o in outs])
        return out


class _Replay(TorchDispatchMode):
    """The fake pass (above ``FakeTensorMode``): the recorded answers, in the same order. A question a
    library asked only on the CPU is passed over; any other mismatch stops the test."""

    def __init__(self, log: list):
        super().__init__()
        self.log, self.pos, self.passed_over = log, 0, []

    def take(self, what):
        site, _ = _asker()
        while self.pos < len(self.log):
            have, at, by_library, answer = self.log[self.pos]
            self.pos += 1
            if (have, at) == (what, site):
                return answer
            if not by_library:
                break
            self.passed_over.append((have, at))
        else:
            have, at = "nothing", None
        raise AssertionError(f"desync: the fake pass asks for {what} at {site} where the real pass had {have} at "
                             f"{at} (answer {self.pos - 1}); does the stage branch on the device?")

    def finish(self) -> None:
        """Every question the project itself asked on the CPU was asked on the device too."""
        unasked = [(what, at) for what, at, by_library, _ in self.log[self.pos:] if not by_library]
        assert not unasked, f"the fake pass never asked {unasked[:3]} (of {len(unasked)})"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _SCALAR:
            return self.take(func)     # a CUDA tensor may give a value (a sync), as on a real GPU
        if func in _SHAPED or _bool_index(func, args):
            shapes = self.take(func)
            dev = args[0].device
            if func is aten.index.Tensor:   # CPU indices into a CUDA tensor are fine, the reverse is not
                for i in args[1]:
                    if i is not None and i.device not in (dev, torch.device("cpu")):
                        raise RuntimeError(f"indices on {i.device} index a tensor on {dev}")
            outs = [torch.empty(s, dtype=d, device=dev) for s, d in shapes]
            return outs[0] if len(outs) == 1 else tuple(outs)
        return func(*args, **(kwargs or {}))


@contextmanager
def _host_copies(record: _Record | None, replay: _Replay | None):
    """``Tensor.numpy`` and ``Tensor.tolist`` reach no dispatched op on a real CPU tensor: record their
    results (real pass) or replay them. ``numpy`` refuses a CUDA tensor as torch does on a GPU (the stage
    must call ``.cpu()`` first); ``tolist`` on one is a sync, allowed."""
    # (set on the class itself, where they may be inherited from torch._C.TensorBase)
    saved = [(cls, name, cls.__dict__.get(name)) for cls in (torch.Tensor, FakeTensor) for name in ("numpy", "tolist")]

    def wrap(name, original):
        def method(self, *args, **kwargs):
            if replay is None:
                record.muted += 1
                try:
                    out = original(self, *args, **kwargs)
                finally:
                    record.muted -= 1
                record.note(name, copy.deepcopy(out))
                return out
            if name == "numpy" and self.device.type != "cpu":
                raise TypeError(f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() first")
            return copy.deepcopy(replay.take(name))
        return method

    for cls, name, _ in saved:
        setattr(cls, name, wrap(name, getattr(cls, name)))
    try:
        yield
    finally:
        for cls, name, original in saved:
            if original is None:
                delattr(cls, name)
            else:
                setattr(cls, name, original)


@pytest.fixture(autouse=True)
def _pinned_cuda_answer(monkeypatch):
    """``torch.cuda.is_available()`` asked once, its answer kept for the test. FakeTensorMode asks it
    on every dispatched op (``avoid_device_init``), and Lightning's import sets
    ``PYTORCH_NVML_BASED_CUDA_CHECK=1``, which makes each ask a ``dlopen("libnvidia-ml.so.1")`` that fails
    here, then a CUDA runtime probe without a driver, thousands of times a test. Unpinned, 3 of 8 runs of
    this file segfaulted with a corrupted heap (in the garbage collector at exit, under glibc's
    MALLOC_CHECK_=3), and in CI it once took both xdist workers down. Pinned: 0 of 8."""
    answer = torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: answer)


def on_fake_cuda(stage, *args):
    """``(stage("cpu", *copies of args), stage("cuda", *args))``: for real on the CPU, then on fake CUDA
    with the real pass's values replayed (see the module). ``args`` are real CPU objects (models, batches);
    the fake pass gets the originals (a stage's ``model.to(device)`` turns them fake)."""
    log: list = []
    record = _Record(log)
    with _host_copies(record, None), record:
        real = stage("cpu", *copy.deepcopy(args))
    replay = _Replay(log)
    with FakeTensorMode(allow_non_fake_inputs=True), _host_copies(None, replay), replay:
        fake = stage("cuda", *args)
    replay.finish()
    return real, fake


def _devices(tree) -> set:
    """The devices of every tensor in a nested dict/list/tuple."""
    if isinstance(tree, torch.Tensor):
        return {tree.device.type}
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        return set().union(*(_devices(v) for v in tree)) if tree else set()
    return set()


def _batches(n: int = 2, b: int = 4, size: int = 16, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, size, size, generator=g), torch.randint(0, classes, (b,), generator=g)) for _ in range(n)]


# ---- the stages ---------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_samples, by_offset", [(False, False), (True, False), (False, True)])
def test_capture_and_gradient_moments_on_fake_cuda(keep_samples, by_offset, monkeypatch):
    """The capture hooks, the (T, Y) and input-patch moment accumulators and the gradient cosines
    (Σ_X solved once its subsample is complete) stay on the model's device; what the Capture holds is
    moved to the CPU explicitly. ``by_offset``: the 3×3 convs stream Cov(x, y) by kernel offset."""
    import axes_pipeline.capture.activations as act

    monkeypatch.setattr(act, "BLOCK_MIN_CIN", 1 if by_offset else act.BLOCK_MIN_CIN)
    def stage(device, model, data):
        units = dict(list(conv_norm_pairs(model).items())[:3])
        return capture_activations(model, units, data, samples_per_image=4, patch_moments=True, sigma_rows=20,
                                   device=device, progress=False, keep_samples=keep_samples,
                                   stream_moments=True)

    real, fake = on_fake_cuda(stage, with_bn_statistics("resnet18", 0.125), _batches())
    assert isinstance(fake.moments["conv1"], FakeTensor)       # the fake pass did run
    assert fake.moments.keys() == real.moments.keys() and fake.gradients.keys() == real.gradients.keys()
    assert {"cos_euclid", "cos_whitened"} <= set(fake.gradients["conv1"])
    for part in (fake.moments, fake.means, fake.gradients, fake.acts, fake.target, fake.image_index):
        assert _devices(part) <= {"cpu"}
    for name, cov in real.moments.items():
        assert fake.moments[name].shape == cov.shape and fake.means[name].shape == real.means[name].shape
    if keep_samples:
        assert fake.acts["conv1"].shape == real.acts["conv1"].shape
        assert _devices([m.xy.state for m in fake.patches.values()]) == {"cpu"}


def test_moment_accumulators_on_fake_cuda():
    """Every accumulator's state is allocated on its rows' device and stays there through update,
    compute and the Chan merge (what a data-parallel sync runs)."""
    def stage(device, rows, t, w):
        rows, t, w = rows.to(device), t.to(device), w.to(device)
        acc = ActivationMoments()
        acc.update(rows[:10], t[:10])
        acc.update(rows[10:], t[10:])
        sym, cross = Moments(upper=True), Moments()
        sym.update(rows, weight=w)
        cross.update(rows[:10], t[:10, None])
        other = Moments()
        other.update(rows[10:], t[10:, None])
        merged = chan_reduce(torch.stack([cross.state, other.state]))
        return {"cov": acc.compute(), "mean": acc.mean, "sym": sym.compute(), "cross": cross.compute(),
                "state": merged, "n": cross.count}

    g = torch.Generator().manual_seed(0)
    real, fake = on_fake_cuda(stage, torch.randn(24, 5, generator=g), torch.randn(24, generator=g),
                              torch.rand(24, generator=g) + 0.5)
    assert _devices(fake) == {"cuda"}
    assert {k: v.shape for k, v in fake.items() if k != "n"} == {k: v.shape for k, v in real.items() if k != "n"}


@pytest.mark.parametrize("hull_order", ["correlation", "greedy"])
def test_channel_axes_on_fake_cuda(hull_order):
    """Both axes of a layer, from samples and from streamed moments, on the samples' device."""
    def stage(device, acts, target):
        acts, target = acts.to(device), target.to(device)
        knobs = dict(hull_order=hull_order, pool=4, top=2, hull_max=3)
        return {"samples": channel_axes(acts, target, **knobs),
                "moments": channel_axes_from_moments(covariance(acts, target), sigma0="p75", **knobs)}

    g = torch.Generator().manual_seed(1)
    acts = torch.randn(64, 7, generator=g, dtype=torch.float64)
    acts[:, 6] = 2 * acts[:, 0] - acts[:, 1]          # a channel its peers explain
    acts[:, 5] = 0.0                                  # a dead channel
    real, fake = on_fake_cuda(stage, acts, acts[:, 0] + torch.randn(64, generator=g, dtype=torch.float64))
    for part in ("samples", "moments"):
        assert tuple(fake[part]) == AXES_KEYS and _devices(fake[part]) == {"cuda"}
        assert all(fake[part][k].shape == real[part][k].shape for k in AXES_KEYS)


def test_gradient_cosines_on_fake_cuda():
    """The cosines from given moments (Σ_X as a matrix and as a fresh builder) and from streamed
    patch moments, on the moments' device."""
    def stage(device, x, w):
        x, w = x.to(device), w.to(device)
        y = x @ w.T
        t = y[:, 0] - 0.5 * y[:, 1]
        pm = PatchMoments.empty(with_sigma_x=True)
        for s in range(0, 48, 16):
            pm.update(x[s:s + 16], y[s:s + 16], t[s:s + 16])
        sx_w, c, sigma = pm.whitened_moments()
        return {"given": gradient_cosines(sx_w.T.contiguous(), c, w, sigma),
                "fresh": gradient_cosines(sx_w.T.contiguous(), c, w, fresh_sigma=pm.sxx.compute),
                "streamed": pm.cosines(w)}

    g = torch.Generator().manual_seed(2)
    real, fake = on_fake_cuda(stage, torch.randn(48, 6, generator=g, dtype=torch.float64),
                              torch.randn(3, 6, generator=g, dtype=torch.float64))
    assert _devices(fake["given"]) == _devices(fake["fresh"]) == {"cuda"}
    assert _devices(fake["streamed"]) == {"cpu"}       # PatchMoments.cosines hands its result to the CPU
    assert set(fake["given"]) == set(real["given"]) and "cos_whitened" in fake["fresh"]


@pytest.mark.parametrize("split", [True, False])
def test_lesion_engine_on_fake_cuda(split):
    """The engine's prefix (once per batch, fx cut) and suffix passes, or the input-repeating path,
    with lesions and peer replacements specified on the CPU and moved per chunk."""
    def stage(device, model, batches, coef):
        model = model.to(device)
        unit = conv_norm_pairs(model)["layer1.0.conv1"]
        c = unit.conv.out_channels
        lesions = Lesions.cat([Lesions.zero([0, 2, c - 1], c),
                               Lesions.replace([1], coef, torch.full((1,), 0.25, dtype=torch.float64))])
        engine = LesionEngine(model, unit, graph=trace(model), split=split, max_rows=8)   # several chunks
        assert engine.batched_prefix == split
        return engine.evaluate(batches, lesions, device)

    model = with_bn_statistics("resnet18", 0.125)
    coef = torch.zeros(1, conv_norm_pairs(model)["layer1.0.conv1"].conv.out_channels, dtype=torch.float64)
    coef[0, 3] = 0.5
    real, fake = on_fake_cuda(stage, model, _batches(), coef)
    assert isinstance(fake.loss_sum, np.ndarray) and fake.loss_sum.shape == real.loss_sum.shape == (4,)
    assert fake.n == real.n == 8


def test_lesion_layer_on_fake_cuda():
    """One layer's lesions and replacements as the analysis runs them: the peer regressions on the
    capture's CPU covariance, the engine on the device."""
    def stage(device, model, batches, acts):
        model = model.to(device)
        unit = conv_norm_pairs(model)["layer1.0.conv1"]
        c = unit.conv.out_channels
        axes_rows = pd.DataFrame({"hull_size": [2] * c}, index=range(c))
        cov = covariance(acts)
        rows, batched = lesion_layer(model, unit, None, None, axes_rows, np.array([0, 1]), batches,
                                     replace=["hull", "all"], ridge=1e-3, device=device, max_rows=32,
                                     cov=cov, mean=acts.mean(0))
        return rows, batched

    model = with_bn_statistics("resnet18", 0.125)
    c = conv_norm_pairs(model)["layer1.0.conv1"].conv.out_channels
    acts = torch.randn(40, c, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (real, _), (fake, batched) = on_fake_cuda(stage, model, _batches(), acts)
    assert batched and list(fake.columns) == list(real.columns) and len(fake) == 2


def test_peer_regressions_and_group_peers_on_fake_cuda():
    """The lesions' peer regressions (hull peers and all peers) and the axes with conv-group peers, on
    the covariance's device."""
    def stage(device, acts, target):
        acts, target = acts.to(device), target.to(device)
        std = standardised(acts, target)
        hull = peer_regression(acts, [0, 3], [[1, 2], [4]], 1e-3, std=std)
        every = peer_regression(acts, [0, 5], "all", 1e-3, std=std)
        unit = SimpleNamespace(conv=torch.nn.Conv2d(6, 6, 3, groups=2))
        grouped = channel_axes_by_peers(covariance(acts, target), unit, peers="group", sigma0="median", pool=2, top=1)
        return hull, every, grouped

    g = torch.Generator().manual_seed(5)
    acts = torch.randn(50, 6, generator=g, dtype=torch.float64)
    acts[:, 5] = 0.0                                  # a dead channel: replaced by its mean
    real, fake = on_fake_cuda(stage, acts, acts[:, 1] + torch.randn(50, generator=g, dtype=torch.float64))
    assert _devices(fake) == {"cuda"}
    assert [t.shape for t in fake[0] + fake[1]] == [t.shape for t in real[0] + real[1]]
    assert tuple(fake[2]) == AXES_KEYS


def test_pruning_evaluate_on_fake_cuda():
    """Pruning's evaluation forward, with its torchmetrics accuracies on the device (its fine-tune
    needs a backward: see the module)."""
    def stage(device, model, batches):
        model = model.to(device)
        return evaluate(model, batches, torch.device(device)), next(model.parameters())

    real, (out, param) = on_fake_cuda(stage, with_bn_statistics("resnet18", 0.125), _batches())
    assert param.device.type == "cuda"
    assert set(out) == set(real[0]) and out["n"] == 8


def test_device_loader_augments_on_fake_cuda():
    """The on-device loader: the split held on the device, crops, flips and normalisation there,
    from a CPU generator (the same draws on any device)."""
    def stage(device, images, labels):
        loader = DeviceBatchLoader(images, labels, batch_size=4, shuffle=True, crop_padding=2, hflip=True,
                                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), seed=0, device=device)
        eval_loader = DeviceBatchLoader(images, labels, batch_size=4, indices=[0, 2, 4], device=device)
        return list(loader) + list(eval_loader)

    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8, generator=g)
    real, fake = on_fake_cuda(stage, images, torch.arange(10) % 3)
    assert len(fake) == len(real) == 4 and _devices(fake) == {"cuda"}
    assert all(x.dtype == torch.float32 and x.shape == r.shape for (x, _), (r, _) in zip(fake, real))


def test_channels_last_training_step_on_fake_cuda():
    """The training module under ``channels_last`` (what ``trainer=gpu`` turns on): moved to the device
    the way Lightning moves it, forward, loss, metric update (no backward: see the module)."""
    def stage(device, module, batches):
        module = module.to(device)
        x, y = (t.to(device) for t in batches[0])
        logits = module(x)
        loss = F.cross_entropy(logits, y)
        module.metrics["train_acc"].update(logits.detach(), y)
        weight = module.model.conv1.weight
        return logits, loss, weight.is_contiguous(memory_format=torch.channels_last)

    torch.manual_seed(0)
    module = ClassifierModule(with_bn_statistics("resnet18", 0.125).train(), optimizer=None, num_classes=10,
                              channels_last=True)
    real, (logits, loss, channels_last) = on_fake_cuda(stage, module, _batches())
    assert real[2] and channels_last
    assert logits.device.type == loss.device.type == "cuda" and logits.shape == real[0].shape


# ---- a misplaced tensor is caught ----------------------------------------------------------------


def test_a_misplaced_accumulator_state_is_caught(monkeypatch):
    """A moment state allocated on the CPU whatever the rows' device passes every CPU test and is
    caught here."""
    new_state = moments_module._new_state
    monkeypatch.setattr(moments_module, "_new_state", lambda p, q, upper, device: new_state(p, q, upper, "cpu"))

    def stage(device, rows):
        acc = Moments()
        acc.update(rows.to(device))
        return acc.compute()

    rows = torch.randn(8, 3)
    assert torch.allclose(stage("cpu", rows), torch.cov(rows.T.double()))   # the CPU run sees nothing wrong
    with pytest.raises(RuntimeError, match="cuda:0 and cpu|same device"):
        on_fake_cuda(stage, rows)


def test_a_misplaced_loader_constant_is_caught(monkeypatch):
    """A normalisation constant built on the CPU inside the loader's batch loop is caught."""
    def normalise(self, x):
        return x.to(torch.float32).sub(torch.full((1, x.shape[1], 1, 1), 0.5))   # no device=

    monkeypatch.setattr(DeviceBatchLoader, "_normalise", normalise)

    def stage(device, images):
        return list(DeviceBatchLoader(images, torch.zeros(4), batch_size=2, device=device))

    images = torch.rand(4, 3, 8, 8)
    assert len(stage("cpu", images)) == 2
    with pytest.raises(RuntimeError, match="cuda:0 and cpu|same device"):
        on_fake_cuda(stage, images)


def test_a_result_left_on_the_device_is_caught(monkeypatch):
    """``.numpy()`` straight off a device tensor (no ``.cpu()``) passes on the CPU and is caught here, as
    a GPU would refuse it."""
    def evaluate_without_cpu(self, batches, lesions, device="cpu"):
        loss = torch.zeros(len(lesions), dtype=torch.float64, device=device)
        return EvalResult(loss.numpy(), loss.long().numpy(), 0)

    monkeypatch.setattr(LesionEngine, "evaluate", evaluate_without_cpu)

    def stage(device, model):
        model = model.to(device).eval()
        unit = conv_norm_pairs(model)["conv1"]
        return LesionEngine(model, unit, split=False).evaluate([], Lesions.zero([0], unit.conv.out_channels), device)

    model = with_bn_statistics("resnet18", 0.125)
    assert stage("cpu", copy.deepcopy(model)).loss_sum.shape == (1,)
    with pytest.raises(TypeError, match="cuda:0 device type tensor to numpy"):
        on_fake_cuda(stage, model)


# ---- the device-placement audit ------------------------------------------------------------------

#: The modules whose tensors live on the model's device (the stages above and their helpers).
AUDITED = ("capture/activations.py", "capture/targets.py", "metrics/moments.py", "metrics/gradients.py",
           "metrics/axes.py", "metrics/gaussian.py", "metrics/hulls.py", "metrics/excess.py", "metrics/peers.py",
           "analyses/lesion_engine.py", "pruning/evaluate.py", "data/device_loader.py")

#: ``torch.*`` calls that create a tensor from nothing: without ``device=`` they land on the CPU.
#: (``*_like`` functions and tensor methods inherit their argument's device and are fine.)
FACTORIES = frozenset({"zeros", "ones", "empty", "full", "arange", "eye", "tensor", "as_tensor", "randn", "rand",
                       "randint", "randperm", "linspace", "logspace", "empty_strided", "scalar_tensor",
                       "triu_indices", "tril_indices"})

#: (module, function, factory) calls that are on the CPU on purpose, each with its reason.
CPU_ON_PURPOSE = {
    # Positions are drawn by a seeded CPU generator (the same samples on every device), then moved
    # by the hook (`.to(y.device)`).
    ("capture/activations.py", "_sample_positions", "rand"),
    ("capture/activations.py", "_sample_positions", "arange"),
    # The image index of kept samples is part of the CPU-side Capture (as are the kept samples).
    ("capture/activations.py", "capture_activations", "arange"),
    # The cache is written and read on the CPU (save_capture / load_capture).
    ("capture/activations.py", "_upper", "triu_indices"),
    ("capture/activations.py", "_full", "triu_indices"),
    ("capture/activations.py", "_full", "zeros"),
    # A metric's empty default state; the first batch allocates the state on its rows' device.
    ("metrics/moments.py", "Moments.__init__", "zeros"),
    # Lesion specs are a CPU description (channel lists, the peer regression fitted on the capture's
    # CPU covariance); LesionEngine._set_chunk moves each chunk to the device.
    ("analyses/lesion_engine.py", "Lesions.zero", "as_tensor"),
    ("analyses/lesion_engine.py", "Lesions.zero", "zeros"),
    ("analyses/lesion_engine.py", "Lesions.zero", "ones"),
    ("analyses/lesion_engine.py", "Lesions.replace", "as_tensor"),
    ("analyses/lesion_engine.py", "Lesions.replace", "zeros"),
    # The channel list of a weight lesion; moved to each parameter's device (`idx.to(p.device)`).
    ("analyses/lesion_engine.py", "zeroed", "as_tensor"),
    # Inputs of the loader, moved to its device in the next expression (`.to(self.device)`).
    ("data/device_loader.py", "DeviceBatchLoader.__init__", "as_tensor"),
    # The epoch's order and augmentation draws come from a seeded CPU generator (the same batches on
    # every device) and are moved in one transfer each.
    ("data/device_loader.py", "DeviceBatchLoader._batches", "randperm"),
    ("data/device_loader.py", "DeviceBatchLoader._batches", "arange"),
    ("data/device_loader.py", "DeviceBatchLoader._batches", "randint"),
    ("data/device_loader.py", "DeviceBatchLoader._batches", "rand"),
}


def factory_calls_without_device(source: str) -> list[tuple[str, str, int]]:
    """``(function qualname, factory, line)`` of every ``torch.<factory>(...)`` call without ``device=``."""
    found, scope = [], []

    class Visitor(ast.NodeVisitor):
        def _scoped(self, node):
            scope.append(node.name)
            self.generic_visit(node)
            scope.pop()

        visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

        def visit_Call(self, node):
            f = node.func
            if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "torch"
                    and f.attr in FACTORIES and not any(k.arg == "device" for k in node.keywords)):
                found.append((".".join(scope) or "<module>", f.attr, node.lineno))
            self.generic_visit(node)

    Visitor().visit(ast.parse(source))
    return found


def _audit() -> dict[tuple[str, str, str], list[int]]:
    calls: dict = {}
    for module in AUDITED:
        for func, factory, line in factory_calls_without_device((SRC / module).read_text()):
            calls.setdefault((module, func, factory), []).append(line)
    return calls


def test_device_placement_audit():
    """No tensor factory without ``device=`` in the device-side modules, except those listed with a reason."""
    unexplained = {k: v for k, v in _audit().items() if k not in CPU_ON_PURPOSE}
    assert not unexplained, ("torch factory calls without device= (they create CPU tensors; pass device=, or "
                             f"list them in CPU_ON_PURPOSE with the reason): {unexplained}")


def test_audit_allowlist_is_current():
    stale = CPU_ON_PURPOSE - set(_audit())
    assert not stale, f"CPU_ON_PURPOSE lists calls that no longer exist: {stale}"


def test_audit_catches_a_factory_without_device():
    source = textwrap.dedent("""
        import torch
        class Acc:
            def update(self, x):
                self.total = torch.zeros(x.shape[1])                 # misplaced
                self.count = torch.zeros((), device=x.device)         # fine
                return torch.zeros_like(x), x.new_zeros(3)            # fine: inherit x's device
    """)
    assert factory_calls_without_device(source) == [("Acc.update", "zeros", 5)]


# ---- each test in a process of its own ----------------------------------------------------------


def _in_a_fork(test):
    """Run ``test`` in a fork of this process and report its outcome here; the fork ends with
    ``os._exit``, skipping the garbage collection and destructors of everything it made.

    Why: the fake-CUDA machinery corrupts the heap now and then on this GPU-less CUDA build (with
    ``torch.cuda.is_available`` pinned, 1 of 6 runs of this file still aborted with "corrupted
    double-linked list" in the collector at exit; in CI a worker died later, in an unrelated test).
    What it corrupts lives and dies in the fork. Where a fork is unsafe (torch running several
    OpenMP threads: a single-process run) the test runs here as before."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        if not hasattr(os, "fork") or torch.get_num_threads() != 1:
            return test(*args, **kwargs)
        with tempfile.TemporaryFile() as report:
            pid = os.fork()
            if pid == 0:                                  # the fork: never returns
                status = 1
                try:
                    test(*args, **kwargs)
                    status = 0
                except BaseException:                     # noqa: BLE001 - reported to the parent
                    report.write(traceback.format_exc().encode())
                finally:
                    report.flush()
                    os._exit(status)
            _, status = os.waitpid(pid, 0)
            report.seek(0)
            text = report.read().decode(errors="replace")
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            pytest.fail(text or f"the test's process died (exit status {code})", pytrace=False)
    return run


for _name, _test in list(globals().items()):
    if _name.startswith("test_") and callable(_test):
        globals()[_name] = _in_a_fork(_test)
