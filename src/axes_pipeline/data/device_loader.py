"""Batches of a small dataset kept as one tensor on the accelerator, augmented there.

For CIFAR-sized data a per-image PIL pipeline in worker processes is the bottleneck of a GPU run.
:class:`DeviceBatchLoader` holds the whole split on the device (``uint8``, or ``float`` in [0, 1]
for digits) and builds each batch with a few vectorised ops: gather, zero-pad, one random crop
offset per image, flip a random half, scale to [0, 1] and normalise, with the arithmetic of
torchvision's ``ToTensor`` + ``Normalize``, so evaluation batches equal the DataLoader path's.

Randomness (order, crop offsets, flips) comes from a CPU generator seeded with ``(seed, epoch)``:
the same seed and epoch give the same batches on any device. The epoch advances by one at each
``iter()``; Lightning also sets it through ``sampler.set_epoch`` (so a resumed run continues the
sequence). Single-process only: under DDP every rank would see the whole split.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F


class _EpochSampler:
    """Lightning calls ``dataloader.sampler.set_epoch(epoch)`` before each epoch; forward it."""

    def __init__(self, owner: DeviceBatchLoader) -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class DeviceBatchLoader:
    """Iterable of ``(x, y)`` batches already on ``device``.

    Args:
        images: ``[N, C, H, W]``, ``uint8`` (scaled by 1/255) or floating (already in [0, 1]).
            Moved to ``device`` once (a no-op when already there).
        labels: ``[N]`` integer class labels.
        batch_size: images per batch; the last batch may be smaller unless ``drop_last``.
        indices: ``[M]`` rows of ``images`` in this loader's split (default: all).
        shuffle: a new seeded order each epoch.
        crop_padding: random crop of the image's own size after zero padding by this many pixels
            on each side (torchvision ``RandomCrop(size, padding=p)``); 0 = no crop.
        hflip: flip each image left-right with probability 1/2.
        mean, std: per-channel normalisation applied after scaling to [0, 1].
        seed: base seed of the per-epoch generator; ``None`` = ``torch.initial_seed()`` at
            construction (the seed Lightning's ``seed_everything`` set).

    Yields ``x: [B, C, H, W] float32`` and ``y: [B] int64`` on ``device``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 indices: torch.Tensor | Sequence[int] | None = None, shuffle: bool = False, crop_padding: int = 0,
                 hflip: bool = False, mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                 seed: int | None = None, drop_last: bool = False, device: torch.device | str | None = None) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else default_device()
        self.images = images.to(self.device)
        self.labels = torch.as_tensor(labels, dtype=torch.long).to(self.device)
        indices = torch.arange(len(self.images), device=self.device) if indices is None else indices
        self.indices = torch.as_tensor(indices, dtype=torch.long).to(self.device)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.crop_padding = int(crop_padding)
        self.hflip = bool(hflip)
        self.drop_last = bool(drop_last)
        self.seed = int(torch.initial_seed() if seed is None else seed)
        self.epoch = 0
        channels = self.images.shape[1]
        self._mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).view(1, channels, 1, 1)
        self._std = torch.as_tensor(std, dtype=torch.float32, device=self.device).view(1, channels, 1, 1)
        self._scale_uint8 = self.images.dtype == torch.uint8
        # What Lightning looks at on a loader: set_epoch via .sampler, no batch sampler.
        self.sampler = _EpochSampler(self)
        self.batch_sampler = None

    @property
    def num_samples(self) -> int:
        return int(self.indices.numel())

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The next ``iter()`` uses this epoch's order and augmentations."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        return self._batches(epoch)

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63 - 1))

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.num_samples
        gen = self._generator(epoch)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        # All of the epoch's random draws at once, in a fixed order, then one transfer.
        offsets = flips = None
        if self.crop_padding > 0:
            offsets = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=gen).to(self.device)
        if self.hflip:
            flips = (torch.rand(n, generator=gen) < 0.5).to(self.device)
        order = order.to(self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            pos = order[start : start + self.batch_size]
            rows = self.indices[pos]
            x = self.images[rows]
            if offsets is not None:
                x = self._random_crop(x, offsets[start : start + len(pos)])
            if flips is not None:
                x = torch.where(flips[start : start + len(pos)].view(-1, 1, 1, 1), x.flip(-1), x)
            yield self._normalise(x), self.labels[rows]

    def _random_crop(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W]; offsets: [B, 2] (row, col) in [0, 2p] -> crops [B, C, H, W] of the padded x."""
        p = self.crop_padding
        b, c, h, w = x.shape
        padded = F.pad(x, (p, p, p, p))  # zeros, as RandomCrop(padding=p) with fill 0
        rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # [B, H]
        cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # [B, W]
        bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
        ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
        return padded[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        if self._scale_uint8:
            x = x.div(255)
        return x.sub(self._mean).div(self._std)

    def __repr__(self) -> str:
        return (
            f"DeviceBatchLoader(n={self.num_samples}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"crop_padding={self.crop_padding}, hflip={self.hflip}, device={self.device})"
        )
