"""One forward pass over the calibration set records, for every analysed conv layer, the moments
of its sampled activations and the target (METHODS §1).

Memory stays bounded: a hook samples ``s`` spatial positions of each image the moment the layer
has run, and streams the unbiased covariance of (T, Y_1..Y_C) (:class:`~axes_pipeline.metrics.moments.ActivationMoments`), so
only ``[B·s, C]`` per layer and batch is ever held, never a full feature map nor the N samples.
Every analysis that reads the capture needs only that covariance and the channel means: the axes,
graphs, hulls and triplets (the covariance), the lesions' peer regressions (covariance + means),
propagation (the channel SDs). The raw samples are kept only when asked (``keep_samples``, tests)
and are never written to the cache.

For the gradient analysis (METHODS §5) the same hook streams the input-patch moments
Cov(x_patch, y) and Cov(x_patch, T) (and, for moderate patch sizes, Σ_X on a capped number of
rows) without storing patches. They depend only on the checkpoint and the capture settings, so
the capture reduces them to the per-channel gradient cosines right away: Σ_X alone is up to
4608² float64 (170 MB) per layer and was most of the old 1.5 GB cache. Every moment is a
:class:`~axes_pipeline.metrics.moments.Moments`; each layer's Σ_X is solved and freed as soon as
its subsample is complete (the first two batches at the defaults).
"""

from __future__ import annotations

import zlib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from axes_pipeline.capture.targets import target_from_logits
from axes_pipeline.errors import UserError, unknown_name
from axes_pipeline.metrics.gaussian import covariance
from axes_pipeline.metrics.gradients import PatchMoments
from axes_pipeline.metrics.moments import ActivationMoments, RowBlocks
from axes_pipeline.runs import atomic_path, fingerprint

POINTS = ("pre_bn", "post_bn", "post_act")
SPATIAL = ("sample", "gap")
#: Patch values extracted at once (a chunk of images, see ``_LayerRecorder.stream_patches``): 512
#: rows of the widest patch (4,608), more rows of a narrower one (a 576-wide patch: 4,096 rows, a
#: batch of 256 images at s = 16), where a chunk of 512 rows cost more in calls than in products.
PATCH_ELEMS = 512 * 4608
#: Version of what :func:`save_capture` writes; a cache file of another version is recomputed.
#: 3: the whitened check's Σ_X products per batch (its cached values moved by up to ~1e-5).
CACHE_FORMAT = 3


@dataclass
class Capture:
    """What one forward pass recorded for the analysed layers.

    Always (the lean form, what the cache holds): ``moments[layer]: [C+1, C+1]`` float64, the
    unbiased covariance of (T, Y_1..Y_C) (element 0 = T), ``means[layer]: [C+1]`` float64,
    ``n`` samples per layer, ``gradients[layer]`` the per-channel gradient cosines ``{name: [C]}``
    (pre-BN layers with patch moments), ``knobs`` the capture settings.

    Only with ``keep_samples`` (in memory, never cached): ``acts[layer]: [N, C]`` float32,
    ``target: [n_img·s]`` float32 (each image's T repeated over its ``s`` samples),
    ``image_index: [n_img·s]`` (which calibration image a sample came from), ``patches[layer]`` the
    streamed patch moments (:class:`~axes_pipeline.metrics.gradients.PatchMoments`). Read the
    statistics through :meth:`cov`, :meth:`channel_mean` and :meth:`channel_sd`: they work on
    either form.

    ``per_image[layer]`` is the samples per image that layer gave: ``s``, or H·W when its map has
    fewer positions (every position once), so its N is ``n_images·per_image`` (:meth:`n_samples`).
    Pair a layer's kept rows with :meth:`target_of` / :meth:`image_index_of`, which follow
    ``target`` (also when a caller replaces it, as ``dynamics.target=final`` does).
    """

    acts: dict[str, torch.Tensor]
    target: torch.Tensor | None
    image_index: torch.Tensor | None
    knobs: dict
    patches: dict[str, PatchMoments] = field(default_factory=dict)
    accuracy: float = float("nan")
    moments: dict[str, torch.Tensor] = field(default_factory=dict)
    means: dict[str, torch.Tensor] = field(default_factory=dict)
    n: int = 0                 # calibration images × s (rows of a layer whose map has ≥ s positions)
    gradients: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    per_image: dict[str, int] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.moments) if self.moments else list(self.acts)

    def cov(self, layer: str) -> torch.Tensor:
        """``[C+1, C+1]`` float64 covariance of (T, Y_1..Y_C): streamed, or from the samples."""
        if self.acts and self.target is not None:
            # samples kept: they are the truth (dynamics may replace the target after capture)
            return covariance(self.acts[layer].double(), self.target_of(layer).double())
        return self.moments[layer]

    def channel_mean(self, layer: str) -> torch.Tensor:
        """``[C]`` float64 mean of each channel."""
        if self.acts:
            return self.acts[layer].double().mean(0)
        return self.means[layer][1:]

    def channel_sd(self, layer: str) -> torch.Tensor:
        """``[C]`` float64 unbiased standard deviation of each channel."""
        if self.acts:
            return self.acts[layer].double().std(dim=0)
        return torch.diagonal(self.moments[layer])[1:].clamp(min=0).sqrt()

    def n_samples(self, layer: str) -> int:
        """N of ``layer``: the rows its statistics are computed from."""
        if self.acts:
            return int(self.acts[layer].shape[0])
        s = int(self.knobs.get("samples_per_image", 1))
        return self.n // s * int(self.per_image.get(layer, s))

    def _per_layer(self, values: torch.Tensor, layer: str) -> torch.Tensor:
        s = int(self.knobs.get("samples_per_image", 1))
        k = int(self.per_image.get(layer, s))
        return values if k == s else values[::s].repeat_interleave(k)

    def target_of(self, layer: str) -> torch.Tensor:
        """``[N_layer]``: T of the image of each of ``layer``'s rows (kept samples only)."""
        return self._per_layer(self.target, layer)

    def image_index_of(self, layer: str) -> torch.Tensor:
        """``[N_layer]``: the calibration image of each of ``layer``'s rows (kept samples only)."""
        return self._per_layer(self.image_index, layer)


def capture_key(identity: dict) -> str:
    """The cache file name of a capture: the short key of its ``runs.run_fingerprint`` (data
    identity, checkpoint content digest, capture settings)."""
    return fingerprint(identity)


def _to_nchw(out: torch.Tensor, channels: int) -> torch.Tensor:
    # ConvNeXt's LayerNorm runs channels-last ([B, H, W, C]); bring it back to [B, C, H, W].
    if out.ndim == 4 and out.shape[1] != channels and out.shape[-1] == channels:
        return out.permute(0, 3, 1, 2)
    return out


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


def patch_order(conv: torch.nn.Module) -> torch.Tensor | None:
    """Where :func:`_patches_at`'s coordinates sit in the flattened filter: coordinate r of a patch is
    coordinate ``perm[r]`` of ``weight.flatten(1)`` (None: the same order, as for 1×1 convs)."""
    if isinstance(conv, torch.nn.Linear) or tuple(conv.kernel_size) == (1, 1):
        return None
    kh, kw = conv.kernel_size
    coords = torch.arange(conv.in_channels * kh * kw, device=conv.weight.device)
    return coords.view(conv.in_channels, kh, kw).permute(1, 2, 0).reshape(-1)


def _patches_at(x: torch.Tensor, conv: torch.nn.Module, b_idx: torch.Tensor, oh: torch.Tensor,
                ow: torch.Tensor) -> torch.Tensor:
    """Input patches of ``conv`` at output positions (b, oh, ow): ``[n, kh·kw·Cin]``, in the order
    the gather yields them, (kh, kw, Cin) (:func:`patch_order` maps it to the filter's (Cin, kh, kw):
    permuting the patches instead would copy every patch matrix once more).

    ``x: [B, Cin, H, W]``. A channels-last ``nn.Linear`` unit is a 1×1 conv: its patch is the input
    feature vector at the position (``x`` already brought to ``[B, Cin, H, W]``)."""
    if isinstance(conv, torch.nn.Linear):
        return x[b_idx, :, oh, ow]
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    top, bottom, left, right = _pads(conv)
    rows = oh[:, None] * sh + torch.arange(kh, device=x.device)[None] * dh - top      # [n, kh], in x
    cols = ow[:, None] * sw + torch.arange(kw, device=x.device)[None] * dw - left     # [n, kw]
    if conv.padding_mode == "zeros":
        # read inside the map and zero what falls on the padding, rather than pad the whole map (a
        # copy of every position for the few sampled ones)
        H, W = x.shape[-2:]
        inside = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]
        patch = x[b_idx[:, None, None], :, rows.clamp(0, H - 1)[:, :, None], cols.clamp(0, W - 1)[:, None, :]]
        if top or bottom or left or right:
            patch.mul_(inside[..., None])                                              # [n, kh, kw, Cin]
    else:   # the conv's reflect / replicate / circular border
        xp = F.pad(x, (left, right, top, bottom), mode=conv.padding_mode)
        patch = xp[b_idx[:, None, None], :, (rows + top)[:, :, None], (cols + left)[:, None, :]]
    return patch.reshape(len(b_idx), -1)


def _pads(conv: torch.nn.Conv2d) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): how far ``conv`` pads its input (with zeros or its ``padding_mode``)."""
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    if conv.padding == "same":   # stride 1 only (torch's rule); the total padding may be odd
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    ph, pw = conv.padding if isinstance(conv.padding, tuple) else (0, 0)
    return ph, ph, pw, pw


def _patch_blocks(x: torch.Tensor, conv: torch.nn.Conv2d, b_idx: torch.Tensor, oh: torch.Tensor,
                  ow: torch.Tensor) -> RowBlocks:
    """:func:`_patches_at`'s rows as :class:`RowBlocks`, one block per kernel offset (kh, kw) (the
    same (kh, kw, Cin) column order): each block holds the ``[m, Cin]`` input vectors of the rows
    whose offset falls inside the map, and the rows where it falls on the padding are zeros that
    are never formed nor multiplied (5 of 9 offsets of a 2×2 map's corner positions)."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    top, _, left, _ = _pads(conv)
    H, W = x.shape[-2:]
    # the input's pixels as rows (one copy of the map): each block is then one gather of whole rows
    pixels = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    blocks = []
    for i in range(kh):
        r = oh * sh + i * dh - top
        for j in range(kw):
            c = ow * sw + j * dw - left
            rows = ((r >= 0) & (r < H) & (c >= 0) & (c < W)).nonzero()[:, 0]
            blocks.append((rows, pixels.index_select(0, (b_idx[rows] * H + r[rows]) * W + c[rows])))
    return RowBlocks(len(b_idx), blocks)


#: Conv inputs from this many channels on stream Cov(x, y) by kernel offset (:func:`_patch_blocks`):
#: per batch of 256 images at s = 16, 512 channels took 0.66–0.76× the dense patches' time at 4×4 and
#: 0.73× at 2×2; 256 channels 0.83–1.12×, 64 and 128 channels 2–3.5× (small GEMMs, nine times the calls).
BLOCK_MIN_CIN = 512
#: Rows per Cov(x, y) product when streamed by kernel offset (a batch of 256 images at s = 16):
#: nothing of D width is formed there, so the chunk can be a batch.
BLOCK_ROWS = 4096


class _LayerRecorder:
    """Hooks of one layer: samples positions, streams the (T, Y) moments and the patch moments,
    keeps the ``[B·s, C]`` samples only with ``keep_samples``."""

    def __init__(self, name, unit, point, spatial, s, seed, patch_moments, max_patch_dim, sigma_rows,
                 keep_samples=False, stream_moments=True):
        self.name, self.unit, self.point, self.spatial, self.s = name, unit, point, spatial, s
        self.gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
        self.chunks: list[torch.Tensor] = []
        self.keep_samples = keep_samples
        self.per_image: int | None = None    # samples per image actually taken: min(s, H·W) (1 with gap)
        self.acc = ActivationMoments() if stream_moments else None
        self.want_patches = patch_moments and has_patch_moments(unit, point, max_patch_dim)
        self.by_offset = (isinstance(unit.conv, torch.nn.Conv2d) and tuple(unit.kernel_size) != (1, 1)
                          and unit.conv.padding_mode == "zeros" and unit.in_channels >= BLOCK_MIN_CIN)
        self.sigma_rows = sigma_rows
        self.moments: PatchMoments | None = None
        self.whitened: torch.Tensor | None = None   # cos_whitened, once the Σ_X subsample is complete
        self._img_x = self._sub = self._pos = self._pending_y = None

    def hook(self):
        module = self.unit.conv if self.point == "pre_bn" or self.unit.norm is None else self.unit.norm
        return module.register_forward_hook(self._record)

    def _record(self, module, args, output):
        C = self.unit.out_channels
        # a Linear unit's own output is [B, H, W, C] (a norm's layout is read off its shape)
        y = output.detach().movedim(-1, 1) if module is self.unit.conv and self.unit.channels_last \
            else _to_nchw(output.detach(), C)
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
        if self.keep_samples:
            self.chunks.append(samples.cpu())
        self._pending_y = samples   # T of this batch is known once the whole network has run
        if self.want_patches and self.spatial == "sample":
            # the conv's input is args[0] here (pre_bn: this is the conv's forward hook); reduce it
            # to patch sums now rather than hold every layer's input map until T is known
            inp = args[0].detach()
            self.stream_patches(inp.movedim(-1, 1) if self.unit.channels_last else inp, samples)

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

    def finish_batch(self, t_img: torch.Tensor) -> None:
        """Accumulate the (T, Y) moments and the patch moments of the last batch once T (per
        image) is known."""
        if self._pending_y is None:
            return
        if self.acc is not None:
            try:
                self.acc.update(self._pending_y, t_img.to(self._pending_y.device).float().repeat_interleave(self.per_image))
            except UserError as err:
                raise UserError(f"layer {self.name}: {err}; is the checkpoint diverged?") from None
        if self._img_x is not None:
            self._finish_patches(t_img)
        self._pending_y = None

    def stream_patches(self, inp: torch.Tensor, samples: torch.Tensor) -> None:
        """Accumulate the patch moments of this batch that do not involve T, and the per-image
        patch sums that the T terms need (T is one value per image: Σ_rows x·t = Σ_img t·Σ_s x).

        Cov(x, y) over all rows takes float32 products into float64 sums (cos_euclid moves by
        < 5e-7), in chunks of images so that the patches of a deep layer (4,096 rows × 4,608 for
        a batch of 256) never exist whole; a conv with a kernel and ≥ ``BLOCK_MIN_CIN`` input
        channels streams them by kernel offset instead (:func:`_patch_blocks`: no patch matrix at
        all, and the padding's zeros skipped). The whitened cosine is a zero check held to 1e-4
        (METHODS §5), so the Σ_X subsample takes float32 products too, one per batch (they move it
        by < 4e-5), summed in float64 and solved in float64."""
        pos, _, W = self._pos
        B = pos.shape[0]
        k = self.per_image
        inp = inp.float()
        if self.moments is None:
            self.moments = PatchMoments.empty(with_sigma_x=self.sigma_rows > 0, perm=patch_order(self.unit.conv))
        m, conv = self.moments, self.unit.conv
        step = max(1, (BLOCK_ROWS if self.by_offset else PATCH_ELEMS // patch_dim(self.unit)) // k)
        img_x = []
        for b0 in range(0, B, step):
            b1 = min(B, b0 + step)
            b_idx = torch.arange(b1 - b0, device=pos.device).repeat_interleave(k)
            flat = pos[b0:b1].reshape(-1)
            y = samples[b0 * k: b1 * k]
            if self.by_offset:
                x = _patch_blocks(inp[b0:b1], conv, b_idx, flat // W, flat % W)
                m.xy.update(x, y)
                img_x.append(torch.cat([inp.new_zeros(b1 - b0, v.shape[1]).index_add_(0, b_idx[rows], v)
                                        for rows, v in x.blocks], dim=1).double())
            else:
                x = _patches_at(inp[b0:b1], conv, b_idx, flat // W, flat % W)              # [rows, D] float32
                m.xy.update(x, y)
                img_x.append(x.reshape(b1 - b0, k, -1).sum(1).double())    # [b, D]; k float32 values each
            del x
        self._img_x = torch.cat(img_x)
        wanted = max(0, self.sigma_rows - m.rows_xx) if m.sxx is not None else 0
        if wanted:
            self._sub = self._stream_subsample(inp, samples, min(wanted, B * k))

    def _stream_subsample(self, inp: torch.Tensor, samples: torch.Tensor, rows: int) -> tuple:
        """Add the batch's first ``rows`` rows to the Σ_X subsample, as dense patches: the
        whitened check's products, in one float64 accumulation for the batch (that accumulation
        of a D×D product costs as much as the product, so it is not done per chunk; the check's
        float32 products then span up to a batch of rows: METHODS §5). Rows are image-major, so
        the subsample holds whole images, then maybe part of one: returns (whole images, the
        partial image's (patch sum, rows) or None) for the T terms."""
        pos, _, W = self._pos
        k = self.per_image
        n_img = -(-rows // k)
        b_idx = torch.arange(n_img, device=pos.device).repeat_interleave(k)[:rows]
        flat = pos[:n_img].reshape(-1)[:rows]
        x = _patches_at(inp[:n_img], self.unit.conv, b_idx, flat // W, flat % W)
        self.moments.sxx.update(x)
        self.moments.sxy.update(x, samples[:rows])
        whole, rest = divmod(rows, k)
        return whole, ((x[whole * k:].sum(0, dtype=torch.float64), rest) if rest else None)

    def _finish_patches(self, t_img: torch.Tensor) -> None:
        """The T terms, from the per-image patch sums: each image is one row of weight k (its rows)."""
        m = self.moments
        t = t_img.to(self._img_x.device).double()[:, None]                               # [B, 1]
        k = float(self.per_image)
        m.xt.update(self._img_x / k, t, weight=torch.full_like(t[:, 0], k))
        if self._sub is not None:
            full, partial = self._sub
            if full:
                m.sxt.update(self._img_x[:full] / k, t[:full], weight=torch.full_like(t[:full, 0], k))
            if partial is not None:
                m.sxt.update(partial[0][None] / partial[1], t[full:full + 1],
                             weight=torch.full_like(t[:1, 0], float(partial[1])))
            if not self.keep_samples and 0 < self.sigma_rows <= m.rows_xx:
                # the subsample is complete and the patch moments are not returned: its whitened
                # cosine now, and its Σ_X (up to 95 MB) freed rather than held by every layer to the end
                self.whitened = m.cosines(self.unit.weight)["cos_whitened"]
                m.free_sigma_x()
        self._img_x = self._sub = None

    def gradient_cosines(self) -> dict[str, torch.Tensor]:
        """The layer's gradient cosines (METHODS §5) from its streamed patch moments."""
        out = self.moments.cosines(self.unit.weight)
        if self.whitened is not None:
            out["cos_whitened"] = self.whitened
        return out


def patch_dim(unit) -> int:
    """D of the unit's input patch, Cin·kh·kw (a ``Linear`` unit's: its input features)."""
    return unit.in_channels * unit.kernel_size[0] * unit.kernel_size[1]


def patch_geometry(unit) -> tuple:
    """What the patch extraction of the unit depends on besides its width: kernel, stride, padding
    (and its mode), dilation (a ``Linear`` unit: its own kind)."""
    conv = unit.conv
    if unit.channels_last:
        return ("linear",)
    return ("conv", tuple(conv.kernel_size), tuple(conv.stride), conv.padding if isinstance(conv.padding, str)
            else tuple(conv.padding), conv.padding_mode, tuple(conv.dilation))


def has_patch_moments(unit, point: str, max_patch_dim: int) -> bool:
    """Whether the gradient analysis (METHODS §5) streams this unit's input-patch moments: a dense
    (groups = 1) conv captured pre-BN whose patch (Cin·k·k) is at most ``max_patch_dim``."""
    return point == "pre_bn" and unit.groups == 1 and patch_dim(unit) <= max_patch_dim


@torch.no_grad()
def capture_activations(model: torch.nn.Module, units: dict, loader, *, point: str = "pre_bn",
                        spatial: str = "sample", samples_per_image: int = 16, target: str = "logit_margin",
                        seed: int = 0, patch_moments: bool = False, max_patch_dim: int = 4608,
                        sigma_rows: int = 8192, sigma_layers: Collection[str] | None = None,
                        device: str | torch.device = "cpu",
                        progress: bool = True, keep_samples: bool = False,
                        stream_moments: bool | None = None, target_values: torch.Tensor | None = None) -> Capture:
    """Run ``model`` once over ``loader`` and record the sampled activations of ``units``.

    ``units``: {layer name: ConvUnit} (the conv, the norm after it, the activation after that).
    ``keep_samples``: also keep the samples and the patch moments (see :class:`Capture`).
    ``stream_moments`` (default: when the samples are not kept) streams the covariance; with
    samples kept it is an extra float64 pass that :meth:`Capture.cov` does not need.
    ``target_values``: T of every calibration image in the loader's order, used instead of the
    network's own (``dynamics.target=final``).
    ``sigma_layers``: the layers whose Σ_X subsample (``sigma_rows``) is formed for the whitened
    check (METHODS §5); None: every layer with patch moments.
    """
    if point not in POINTS:
        raise unknown_name("activation point (capture.point)", point, POINTS)
    if spatial not in SPATIAL:
        raise unknown_name("spatial mode (capture.spatial)", spatial, SPATIAL)
    s = 1 if spatial == "gap" else int(samples_per_image)
    if s <= 0:
        raise UserError(f"capture.samples_per_image must be positive, got {samples_per_image}")
    if stream_moments is None:
        stream_moments = not keep_samples
    model = model.eval().to(device)
    recorders = {name: _LayerRecorder(name, unit, point, spatial, s, seed, patch_moments, max_patch_dim,
                                      sigma_rows if sigma_layers is None or name in sigma_layers else 0,
                                      keep_samples, stream_moments) for name, unit in units.items()}
    handles = [r.hook() for r in recorders.values()]
    targets, images, correct, seen = [], [], 0, 0
    try:
        for x, y in tqdm(loader, desc=f"capture ({len(units)} layers)", disable=None if progress else True, leave=False):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            t = target_from_logits(logits, y, target) if target_values is None else \
                target_values[seen: seen + len(y)].to(device=logits.device, dtype=torch.float32)
            if not bool(torch.isfinite(t).all()):
                # name the first layer that went non-finite (the cause), else blame the logits
                for r in recorders.values():
                    if r._pending_y is not None and not bool(torch.isfinite(r._pending_y).all()):
                        raise UserError(f"layer {r.name}: activations contain NaN or Inf; is the checkpoint "
                                        f"diverged?")
                raise UserError("the target T has NaN/Inf values: the network's logits are not finite")
            for r in recorders.values():
                r.finish_batch(t)
            if keep_samples:
                targets.append(t.cpu().repeat_interleave(s))
                images.append(torch.arange(seen, seen + len(y)).repeat_interleave(s))
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
    finally:
        for h in handles:
            h.remove()
    knobs = dict(point=point, spatial=spatial, samples_per_image=s, target=target, seed=int(seed))
    patches = {name: r.moments for name, r in recorders.items() if r.moments is not None}
    gradients = {}
    for name in list(patches):
        if patches[name].n > 1:
            gradients[name] = recorders[name].gradient_cosines()
        if not keep_samples:   # free each layer's Σ_X (up to 170 MB) before the next one's solve
            recorders[name].moments.release()
            recorders[name].moments = None
            del patches[name]
    moments, means = {}, {}
    for name, r in recorders.items():
        if r.acc is not None and r.acc.count > 1:
            moments[name], means[name] = r.acc.compute().cpu(), r.acc.mean.cpu()
        if r.acc is not None:
            r.acc.reset()      # now, not whenever the cycle collector gets to the metric
            r.acc = None
    cap = Capture(acts={}, target=None, image_index=None, knobs=knobs, accuracy=correct / max(1, seen),
                  moments=moments, means=means, n=seen * s, gradients=gradients,
                  per_image={name: int(r.per_image if r.per_image is not None else s) for name, r in recorders.items()})
    if keep_samples:
        cap.acts = {name: torch.cat(r.chunks) for name, r in recorders.items()}
        cap.target, cap.image_index = torch.cat(targets), torch.cat(images)
        for m in patches.values():
            for acc in (m.xy, m.xt, m.sxx, m.sxy, m.sxt):
                if acc is not None:
                    acc.state = acc.state.cpu()
        cap.patches = patches
    return cap


def check_finite(capture: Capture) -> None:
    """Stop, naming the layer, when activations hold NaN or Inf (the streamed moments already
    stopped during the capture; this checks samples, e.g. after a target was replaced)."""
    if capture.target is not None and not torch.isfinite(capture.target).all():
        raise UserError("the target T has NaN/Inf values: the network's logits are not finite")
    for name, a in capture.acts.items():
        if not torch.isfinite(a).all():
            raise UserError(f"layer {name}: activations contain NaN or Inf "
                            f"({int((~torch.isfinite(a)).sum())} values); is the checkpoint diverged?")


def save_capture(capture: Capture, path: Path, identity: dict | None = None) -> None:
    """Write the lean form: moments, means, gradient cosines (never the samples), with the
    ``identity`` (run fingerprint) it was made under.

    The covariance is symmetric, so only its upper triangle is stored (half the bytes: ~7 MB for
    a full-width ResNet-18 against 1.5 GB of samples and patch moments before)."""
    if not capture.moments:
        raise ValueError("save_capture needs the streamed moments (capture_activations(keep_samples=False))")
    blob = {"format": CACHE_FORMAT, "knobs": capture.knobs, "accuracy": capture.accuracy, "n": capture.n,
            "moments": {k: _upper(v) for k, v in capture.moments.items()}, "means": capture.means,
            "gradients": capture.gradients, "per_image": capture.per_image, "identity": identity}
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def load_capture(path: Path, identity: dict | None = None) -> Capture | None:
    """The capture cached at ``path``; None when it is of another format, was made under another
    ``identity`` (when one is given) or is unreadable (truncated, foreign): the caller captures again."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable cache is simply recomputed
        return None
    if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT:
        return None
    if identity is not None and blob.get("identity") != identity:
        return None
    return Capture(acts={}, target=None, image_index=None, knobs=blob["knobs"], accuracy=blob["accuracy"],
                   moments={k: _full(v) for k, v in blob["moments"].items()}, means=blob["means"],
                   n=int(blob["n"]), gradients=blob["gradients"], per_image=blob.get("per_image", {}))


def _upper(cov: torch.Tensor) -> torch.Tensor:
    i, j = torch.triu_indices(cov.shape[0], cov.shape[0])
    return cov[i, j].contiguous()


def _full(upper: torch.Tensor) -> torch.Tensor:
    # the side c solves c(c+1)/2 = len(upper)
    c = int(round(((8 * upper.numel() + 1) ** 0.5 - 1) / 2))
    i, j = torch.triu_indices(c, c)
    cov = torch.zeros(c, c, dtype=upper.dtype)
    cov[i, j] = upper
    cov[j, i] = upper
    return cov
