"""One forward pass over the calibration set records, for every analysed conv layer, sampled
activations and the target (METHODS §1).

Memory stays bounded: a hook samples ``s`` spatial positions of each image the moment the layer
has run, so only ``[B·s, C]`` per layer and batch is kept, never a full feature map. For the
gradient analysis (METHODS §5) the same hook streams the input-patch moments Cov(x_patch, y) and
Cov(x_patch, T) (and, for moderate patch sizes, Σ_X on a capped number of rows) without storing
patches.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from axes_pipeline.capture.targets import target_from_logits
from axes_pipeline.errors import UserError, unknown_name

POINTS = ("pre_bn", "post_bn", "post_act")
PATCH_FIELDS = ("sxy", "sxt", "sx", "sy", "st", "sxx", "sx_xx", "sub_xy", "sub_xt", "sub_y", "sub_t")
SPATIAL = ("sample", "gap")


@dataclass
class LayerPatchMoments:
    """Streamed sums for the gradient analysis of one layer (float64).

    ``sxy: [D, C]`` Σ x·y, ``sxt: [D]`` Σ x·t, ``sx: [D]``, ``sy: [C]``, ``st``, ``n`` over all rows.
    Σ_X (``sxx: [D, D]``) costs N·D² and is kept over the first ``rows_xx`` rows only, together with
    the cross sums of those same rows (``sub_*``): the whitened cosine is 0 only when Σ_X w and Σ_X
    come from one sample, so it is computed from that subsample (see :meth:`whitened_moments`).
    """

    sxy: torch.Tensor
    sxt: torch.Tensor
    sx: torch.Tensor
    sy: torch.Tensor
    st: torch.Tensor
    n: int = 0
    sxx: torch.Tensor | None = None
    sx_xx: torch.Tensor | None = None
    rows_xx: int = 0
    sub_xy: torch.Tensor | None = None
    sub_xt: torch.Tensor | None = None
    sub_y: torch.Tensor | None = None
    sub_t: torch.Tensor | None = None

    def cov_xy(self) -> torch.Tensor:
        """Cov(x_patch, y) = Σ_X w for a pre-BN channel: ``[D, C]``."""
        n = self.n
        return (self.sxy - torch.outer(self.sx, self.sy) / n) / (n - 1)

    def cov_xt(self) -> torch.Tensor:
        n = self.n
        return (self.sxt - self.sx * self.st / n) / (n - 1)

    def sigma_x(self) -> torch.Tensor | None:
        if self.sxx is None or self.rows_xx < 2:
            return None
        m = self.rows_xx
        return (self.sxx - torch.outer(self.sx_xx, self.sx_xx) / m) / (m - 1)

    def whitened_moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(Cov(x, y) [D, C], Cov(x, T) [D], Σ_X [D, D]) all over the Σ_X subsample, or None."""
        sigma = self.sigma_x()
        if sigma is None:
            return None
        m = self.rows_xx
        cxy = (self.sub_xy - torch.outer(self.sx_xx, self.sub_y) / m) / (m - 1)
        cxt = (self.sub_xt - self.sx_xx * self.sub_t / m) / (m - 1)
        return cxy, cxt, sigma


@dataclass
class Capture:
    """Sampled activations of the analysed layers.

    ``acts[layer]: [N_layer, C]`` float32, ``target: [n_img·s]`` float32 (each image's T repeated
    over its ``s`` samples), ``image_index: [n_img·s]`` (which calibration image a sample came
    from), ``per_image[layer]`` the samples per image of that layer (``s``, or H·W when its map
    has fewer positions, so N_layer = n_img·per_image), ``patches[layer]`` streamed patch moments
    (pre-BN only), ``knobs`` the capture settings. Pair a layer's rows with
    :meth:`target_of` / :meth:`image_index_of`, which follow ``target`` (also when a caller
    replaces it, as ``dynamics.target=final`` does).
    """

    acts: dict[str, torch.Tensor]
    target: torch.Tensor
    image_index: torch.Tensor
    knobs: dict
    patches: dict[str, LayerPatchMoments] = field(default_factory=dict)
    accuracy: float = float("nan")
    per_image: dict[str, int] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.acts)

    def n_samples(self, layer: str) -> int:
        """N of ``layer``: the rows its statistics are computed from."""
        return int(self.acts[layer].shape[0])

    def _per_layer(self, values: torch.Tensor, layer: str) -> torch.Tensor:
        s = int(self.knobs.get("samples_per_image", 1))
        k = int(self.per_image.get(layer, s))
        return values if k == s else values[::s].repeat_interleave(k)

    def target_of(self, layer: str) -> torch.Tensor:
        """``[N_layer]``: T of the image of each of ``layer``'s rows."""
        return self._per_layer(self.target, layer)

    def image_index_of(self, layer: str) -> torch.Tensor:
        """``[N_layer]``: the calibration image of each of ``layer``'s rows."""
        return self._per_layer(self.image_index, layer)


def capture_key(identity: dict) -> str:
    """The cache file name of a capture: the short key of its ``runs.run_fingerprint`` (data
    identity, checkpoint content digest, capture settings)."""
    from axes_pipeline.runs import fingerprint

    return fingerprint(identity)


def _to_nchw(out: torch.Tensor, channels: int) -> torch.Tensor:
    # ConvNeXt's LayerNorm runs channels-last ([B, H, W, C]); bring it back to [B, C, H, W].
    if out.ndim == 4 and out.shape[1] != channels and out.shape[-1] == channels:
        return out.permute(0, 3, 1, 2)
    return out


def _layer_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


#: How positions are drawn (part of every capture cache key): ``s`` distinct positions per image, or
#: every position once when the map has fewer than ``s``.
POSITIONS = "distinct; every position once when H*W < s"


def _sample_positions(batch: int, hw: int, s: int, gen: torch.Generator) -> torch.Tensor:
    """``[batch, min(s, H·W)]`` flat positions per image, drawn without replacement.

    A map with fewer than ``s`` positions (VGG-16's 2×2 last block at s = 16) gives each of its
    H·W positions once: drawing with replacement would repeat rows, so N = n_cal·s would overstate
    the independent samples behind every estimate of that layer. Its N is n_cal·H·W instead
    (``Capture.per_image``)."""
    if s <= hw:
        return torch.rand(batch, hw, generator=gen).argsort(dim=1)[:, :s]
    return torch.arange(hw).expand(batch, hw)


def _patches_at(x: torch.Tensor, conv: torch.nn.Conv2d, b_idx: torch.Tensor, oh: torch.Tensor,
                ow: torch.Tensor) -> torch.Tensor:
    """Input patches of ``conv`` at output positions (b, oh, ow): ``[n, Cin·kh·kw]`` (weight layout)."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    if conv.padding == "same":   # stride 1 only (torch's rule); the total padding may be odd
        th, tw = dh * (kh - 1), dw * (kw - 1)
        xp = F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
    else:
        ph, pw = conv.padding if isinstance(conv.padding, tuple) else (0, 0)
        xp = F.pad(x, (pw, pw, ph, ph))
    rows = oh[:, None] * sh + torch.arange(kh, device=x.device)[None] * dh      # [n, kh]
    cols = ow[:, None] * sw + torch.arange(kw, device=x.device)[None] * dw      # [n, kw]
    patch = xp[b_idx[:, None, None], :, rows[:, :, None], cols[:, None, :]]     # [n, kh, kw, Cin]
    return patch.permute(0, 3, 1, 2).reshape(len(b_idx), -1)


class _LayerRecorder:
    """Hooks of one layer: samples positions, stores ``[B·s, C]``, streams patch moments."""

    def __init__(self, name, unit, point, spatial, s, seed, patch_moments, max_patch_dim, sigma_rows):
        self.name, self.unit, self.point, self.spatial, self.s = name, unit, point, spatial, s
        self.gen = torch.Generator().manual_seed(_layer_seed(seed, name))
        self.chunks: list[torch.Tensor] = []
        self.per_image: int | None = None    # samples per image actually taken: min(s, H·W)
        conv = unit.conv
        self.want_patches = (patch_moments and point == "pre_bn" and conv.groups == 1
                             and conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] <= max_patch_dim)
        self.sigma_rows = sigma_rows
        self.moments: LayerPatchMoments | None = None
        self._input = None
        self._pos = None
        self._pending_y = None

    def hooks(self):
        conv = self.unit.conv
        out = []
        if self.want_patches:
            out.append(conv.register_forward_pre_hook(self._keep_input))
        if self.point == "pre_bn" or self.unit.norm is None:
            out.append(conv.register_forward_hook(self._record))
        else:
            out.append(self.unit.norm.register_forward_hook(self._record))
        return out

    def _keep_input(self, module, args):
        self._input = args[0].detach()

    def _record(self, module, args, output):
        C = self.unit.conv.out_channels
        y = _to_nchw(output.detach(), C)
        if self.point == "post_act":  # after the norm, or on the conv output where no norm follows
            y = self._activate(y)
        B, _, H, W = y.shape
        if self.spatial == "gap":
            samples = y.float().mean(dim=(2, 3))                                   # [B, C]
            self._pos = None
        else:
            pos = _sample_positions(B, H * W, self.s, self.gen).to(y.device)      # [B, k], k = min(s, H·W)
            k = pos.shape[1]
            if self.per_image not in (None, k):
                raise UserError(f"layer {self.name}: its feature map changed size between batches "
                                f"({self.per_image} vs {k} samples per image); use one image size")
            flat = y.float().reshape(B, C, H * W)
            samples = flat.gather(2, pos[:, None, :].expand(B, C, k))              # [B, C, k]
            samples = samples.permute(0, 2, 1).reshape(B * k, C)
            self._pos = (pos, H, W)
        self.per_image = samples.shape[0] // B
        self.chunks.append(samples.cpu())
        if self.want_patches and self.spatial == "sample":
            self._pending_y = samples

    def _activate(self, y):
        act = self.unit.act
        if act is None:
            return y
        # Our own copy: the modules are often in-place (ReLU(inplace=True)) and for residual units
        # the block's ReLU follows the add; post_act here is the unit's nonlinearity applied to
        # its own post-norm signal, never the block output.
        try:
            return act(y.clone())
        except Exception as err:  # noqa: BLE001 - an activation that is not elementwise on [N, C]
            raise UserError(f"layer {self.name}: its activation {type(act).__name__} cannot be applied to the "
                            f"sampled post-norm values ({type(err).__name__}); use capture.point=post_bn") from None

    def stream_patches(self, t_img: torch.Tensor) -> None:
        """Accumulate patch moments for the last batch once T (per image) is known."""
        if self._pending_y is None or self._pos is None or self._input is None:
            return
        pos, H, W = self._pos
        B = pos.shape[0]
        k = pos.shape[1]
        b_idx = torch.arange(B, device=pos.device).repeat_interleave(k)
        flat = pos.reshape(-1)
        x = _patches_at(self._input.float(), self.unit.conv, b_idx, flat // W, flat % W).double()
        y = self._pending_y.double()
        t = t_img.to(x.device).double().repeat_interleave(k)
        if self.moments is None:
            D, C = x.shape[1], y.shape[1]
            z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=x.device)  # noqa: E731
            sub = self.sigma_rows > 0
            self.moments = LayerPatchMoments(z(D, C), z(D), z(D), z(C), z(()),
                                             sxx=z(D, D) if sub else None, sx_xx=z(D) if sub else None,
                                             sub_xy=z(D, C) if sub else None, sub_xt=z(D) if sub else None,
                                             sub_y=z(C) if sub else None, sub_t=z(()) if sub else None)
        m = self.moments
        m.sxy += x.T @ y
        m.sxt += x.T @ t
        m.sx += x.sum(0)
        m.sy += y.sum(0)
        m.st += t.sum()
        m.n += len(t)
        if m.sxx is not None and m.rows_xx < self.sigma_rows:
            k = self.sigma_rows - m.rows_xx
            take, ty, tt = x[:k], y[:k], t[:k]
            m.sxx += take.T @ take
            m.sx_xx += take.sum(0)
            m.sub_xy += take.T @ ty
            m.sub_xt += take.T @ tt
            m.sub_y += ty.sum(0)
            m.sub_t += tt.sum()
            m.rows_xx += len(take)
        self._pending_y = None
        self._input = None


@torch.no_grad()
def capture_activations(model: torch.nn.Module, units: dict, loader, *, point: str = "pre_bn",
                        spatial: str = "sample", samples_per_image: int = 16, target: str = "logit_margin",
                        seed: int = 0, patch_moments: bool = False, max_patch_dim: int = 4608,
                        sigma_rows: int = 8192, device: str | torch.device = "cpu",
                        progress: bool = True) -> Capture:
    """Run ``model`` once over ``loader`` and record the sampled activations of ``units``.

    ``units``: {layer name: ConvUnit} (the conv, the norm after it, the activation after that).
    Returns a :class:`Capture`; acts are ``[N, C]`` with N = images · s (or images with ``gap``).
    """
    if point not in POINTS:
        raise unknown_name("activation point (capture.point)", point, POINTS)
    if spatial not in SPATIAL:
        raise unknown_name("spatial mode (capture.spatial)", spatial, SPATIAL)
    s = 1 if spatial == "gap" else int(samples_per_image)
    if s <= 0:
        raise UserError(f"capture.samples_per_image must be positive, got {samples_per_image}")
    model = model.eval().to(device)
    recorders = {name: _LayerRecorder(name, unit, point, spatial, s, seed, patch_moments,
                                      max_patch_dim, sigma_rows) for name, unit in units.items()}
    handles = [h for r in recorders.values() for h in r.hooks()]
    targets, images, correct, seen = [], [], 0, 0
    try:
        for x, y in tqdm(loader, desc=f"capture ({len(units)} layers)", disable=None if progress else True, leave=False):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            t = target_from_logits(logits, y, target)
            for r in recorders.values():
                r.stream_patches(t)
            targets.append(t.cpu().repeat_interleave(s))
            images.append(torch.arange(seen, seen + len(y)).repeat_interleave(s))
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
    finally:
        for h in handles:
            h.remove()
    acts = {name: torch.cat(r.chunks) for name, r in recorders.items()}
    patches = {name: r.moments for name, r in recorders.items() if r.moments is not None}
    knobs = dict(point=point, spatial=spatial, samples_per_image=s, target=target, seed=int(seed))
    per_image = {name: int(r.per_image if r.per_image is not None else s) for name, r in recorders.items()}
    return Capture(acts=acts, target=torch.cat(targets), image_index=torch.cat(images), knobs=knobs,
                   patches={k: _to_cpu(v) for k, v in patches.items()}, accuracy=correct / max(1, seen),
                   per_image=per_image)


def _to_cpu(m: LayerPatchMoments) -> LayerPatchMoments:
    for f in PATCH_FIELDS:
        v = getattr(m, f)
        if v is not None:
            setattr(m, f, v.cpu())
    return m


def check_finite(capture: Capture) -> None:
    """Stop, naming the layer, when activations hold NaN or Inf."""
    if not torch.isfinite(capture.target).all():
        raise UserError("the target T has NaN/Inf values: the network's logits are not finite")
    for name, a in capture.acts.items():
        if not torch.isfinite(a).all():
            raise UserError(f"layer {name}: activations contain NaN or Inf "
                            f"({int((~torch.isfinite(a)).sum())} values); is the checkpoint diverged?")


def save_capture(capture: Capture, path: Path, identity: dict | None = None) -> None:
    """Write ``capture`` with the ``identity`` (run fingerprint) it was made under."""
    from axes_pipeline.runs import atomic_path

    blob = {"acts": capture.acts, "target": capture.target, "image_index": capture.image_index,
            "knobs": capture.knobs, "accuracy": capture.accuracy, "identity": identity, "per_image": capture.per_image,
            "patches": {k: {f: getattr(v, f) for f in (*PATCH_FIELDS, "n", "rows_xx")}
                        for k, v in capture.patches.items()}}
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def load_capture(path: Path, identity: dict | None = None) -> Capture | None:
    """The capture cached at ``path``; None when it was made under another ``identity`` (when one
    is given) or the file is unreadable (truncated, foreign): the caller captures again."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable cache is simply recomputed
        return None
    if identity is not None and blob.get("identity") != identity:
        return None
    patches = {k: LayerPatchMoments(**v) for k, v in blob["patches"].items()}
    return Capture(acts=blob["acts"], target=blob["target"], image_index=blob["image_index"],
                   knobs=blob["knobs"], patches=patches, accuracy=blob["accuracy"],
                   per_image=blob.get("per_image", {}))
