"""Loading ImageNet (or any local) weights into a backbone.

Weights come from a file the user names (``model.weights=PATH``) or from torchvision's hub cache
(``$TORCH_HOME/hub/checkpoints``, see :func:`torch.hub.get_dir`). ``model.pretrained=true`` with
the file not yet cached downloads torchvision's ImageNet weights into that cache on first use, as
torchvision itself does (same URL, same file name, its hash prefix checked); without network that
is one :class:`UserError` line naming the file and the folder to put it in. The classifier and
every tensor whose shape does not fit (``width`` ≠ 1, the CIFAR stem, a different
``num_classes``) are skipped, and a :class:`LoadReport` says what was loaded and what was not.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from axes_pipeline.errors import UserError
from axes_pipeline.models.layers import classifier_name

log = logging.getLogger(__name__)

# torchvision's weight enums (by attribute name, resolved lazily) for the hub-cache lookup.
_TORCHVISION_WEIGHTS = {
    "resnet18": ("torchvision.models.resnet", "ResNet18_Weights"),
    "vgg16": ("torchvision.models.vgg", "VGG16_BN_Weights"),
    "mobilenetv2": ("torchvision.models.mobilenetv2", "MobileNet_V2_Weights"),
    "convnext_t": ("torchvision.models.convnext", "ConvNeXt_Tiny_Weights"),
}

_PREFIXES = ("module.", "model.", "net.", "_orig_mod.", "model.model.")


@dataclass
class LoadReport:
    """What :func:`load_weights` did. Keys are state_dict keys of the model.

    ``skipped_shape``: ``(key, shape in file, shape in model)``; ``unexpected``: keys in the file
    that the model does not have; ``missing``: model keys the file did not provide (or that were
    skipped), i.e. left at their random initialisation.
    """

    path: str
    loaded: list[str] = field(default_factory=list)
    skipped_classifier: list[str] = field(default_factory=list)
    skipped_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: counts, and the first few shape-skipped keys."""
        line = (f"loaded {len(self.loaded)} tensors from {self.path}; skipped {len(self.skipped_classifier)} classifier; "
                f"{len(self.skipped_shape)} shape-mismatched; {len(self.unexpected)} unknown keys; "
                f"{len(self.missing)} model tensors left at init")
        if self.skipped_shape:
            shown = ", ".join(f"{k} {list(a)}→{list(b)}" for k, a, b in self.skipped_shape[:3])
            more = f" (+{len(self.skipped_shape) - 3} more)" if len(self.skipped_shape) > 3 else ""
            line += f" [shape-skipped: {shown}{more}]"
        return line


def _weights_members(name: str, tag: str | None = None) -> list:
    """torchvision's weight-enum members for backbone ``name`` (``tag`` only, or DEFAULT first and
    then the others); ``[]`` for a backbone torchvision has no weights for. Unknown ``tag``: KeyError."""
    spec = _TORCHVISION_WEIGHTS.get(name)
    # any torchvision arch (model=torchvision): torchvision's own registry
    enum = getattr(importlib.import_module(spec[0]), spec[1]) if spec is not None else _arch_weights(name)
    if enum is None:
        return []
    return [enum[tag]] if tag is not None else [enum.DEFAULT, *[m for m in enum if m is not enum.DEFAULT]]


def _arch_weights(arch: str):
    """torchvision's weights enum of architecture ``arch`` (``resnet50``), or None."""
    import torchvision.models as tvm

    try:
        return tvm.get_model_weights(arch)
    except (ValueError, KeyError):
        return None


def _has_weights(name: str) -> bool:
    return name in _TORCHVISION_WEIGHTS or _arch_weights(name) is not None


def hub_checkpoints() -> Path:
    """torchvision's download folder: ``torch.hub.get_dir()/checkpoints`` ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hub_cache_file(name: str, tag: str | None = None) -> Path | None:
    """The torchvision ImageNet weights file for backbone ``name`` if it is already in the hub
    cache (:func:`hub_checkpoints`), else ``None``. ``tag``: a member of the torchvision weights
    enum (``IMAGENET1K_V1``, ``DEFAULT``, …); without it DEFAULT is tried first, then every other
    member."""
    for member in _weights_members(name, tag):
        candidate = hub_checkpoints() / os.path.basename(member.url)
        if candidate.is_file():
            return candidate
    return None


def download_weights(name: str, tag: str | None = None) -> Path:
    """Download torchvision's ImageNet weights of ``name`` (``tag``, default DEFAULT) into the hub
    cache, as ``torchvision`` does on first use: same URL and file name, the hash prefix in the
    file name checked, written to a temporary file and renamed. Offline (or any failure): a
    one-line :class:`UserError` saying where to put the file instead."""
    url = _weights_members(name, tag)[0].url
    dest = hub_checkpoints() / os.path.basename(url)
    match = torch.hub.HASH_REGEX.search(dest.name)
    log.info("model %s: downloading ImageNet weights %s to %s", name, url, dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(dest), match.group(1) if match else None, progress=True)
    except Exception as exc:  # noqa: BLE001 - URLError/OSError offline, RuntimeError on a bad hash
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"model.pretrained=true: could not download the ImageNet weights of {name} from {url} ({first}); "
            f"without network, put {dest.name} in {dest.parent} (torchvision's hub cache, $TORCH_HOME/hub/"
            "checkpoints), or pass model.weights=PATH to a local state_dict, or set model.pretrained=false"
        ) from None
    return dest


def resolve_weights(name: str, weights: str | None) -> Path:
    """The file to load for ``model.pretrained=true`` / ``model.weights=...``.

    ``weights`` is a path, or the name of a torchvision weights enum member (``IMAGENET1K_V1``,
    ``DEFAULT``); ``None`` means "torchvision's default weights". A torchvision weight not yet in
    the hub cache is downloaded there (:func:`download_weights`). Raises :class:`UserError` when
    no readable file can be had.
    """
    if weights is not None:
        path = Path(os.path.expanduser(str(weights)))
        if path.is_file():
            if not os.access(path, os.R_OK):
                raise UserError(f"model.weights={weights} is not readable; fix its permissions or pass another file")
            return path
        if _has_weights(name) and str(weights).isupper():
            try:
                cached = hub_cache_file(name, str(weights))
            except KeyError:
                cached = None
            else:
                return cached if cached is not None else download_weights(name, str(weights))
        raise UserError(
            f"model.weights={weights}: no such file (nor a torchvision weights name for {name}); pass "
            "model.weights=PATH to a local state_dict"
        )
    cached = hub_cache_file(name)
    if cached is not None:
        return cached
    if not _has_weights(name):
        raise UserError(f"model.pretrained=true but torchvision has no ImageNet weights for {name}; "
                        "pass model.weights=PATH to a local state_dict, or set model.pretrained=false")
    return download_weights(name)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"cannot read weights file {path} with torch.load(weights_only=True) ({first}); "
            "save a plain state_dict with torch.save(model.state_dict(), PATH)"
        ) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise UserError(f"weights file {path} holds a {type(obj).__name__}, not a state_dict; save model.state_dict()")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip_prefix(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Remove a wrapper prefix (``module.``, ``model.``, …) if that makes more keys match."""
    best, best_hits = state, sum(k in model_keys for k in state)
    for prefix in _PREFIXES:
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        hits = sum(k in model_keys for k in stripped)
        if hits > best_hits:
            best, best_hits = stripped, hits
    return best


def load_weights(model: nn.Module, path: str | os.PathLike, *, skip_classifier: bool = True) -> LoadReport:
    """Load the tensors of the state_dict at ``path`` that fit ``model``, in place.

    The final classifier (the last ``nn.Linear``, see :func:`classifier_name`) is skipped when
    ``skip_classifier``; keys absent from the model or with another shape are skipped. The file
    is read with ``torch.load(..., weights_only=True)``; a Lightning-style ``{"state_dict": ...}``
    and ``module.`` / ``model.`` prefixes are accepted. Raises :class:`UserError` if nothing fits.
    """
    path = Path(path)
    own = model.state_dict()
    state = _strip_prefix(_read_state_dict(path), set(own))
    head = classifier_name(model) if skip_classifier else None
    report = LoadReport(path=str(path))
    keep: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if head is not None and (key.startswith(head + ".") or key == head):
            report.skipped_classifier.append(key)
        elif key not in own:
            report.unexpected.append(key)
        elif tuple(tensor.shape) != tuple(own[key].shape):
            report.skipped_shape.append((key, tuple(tensor.shape), tuple(own[key].shape)))
        else:
            keep[key] = tensor
    if not any(k in keep for k, v in own.items() if v.is_floating_point() and not k.endswith("num_batches_tracked")):
        raise UserError(
            f"weights file {path} fits no layer of this model (shape-mismatched: {len(report.skipped_shape)}, "
            f"unknown keys: {len(report.unexpected)}); ImageNet weights need model.width=1.0 and the same backbone"
        )
    model.load_state_dict(keep, strict=False)
    report.loaded = list(keep)
    report.missing = [k for k in own if k not in keep]
    return report
