"""scikit-learn's bundled 8×8 digits (1,797 images, 10 classes): the offline default dataset.

The 8×8 grey images (values 0..16) are scaled to [0, 1], resized bilinearly to ``image_size``
and repeated to 3 channels, so every backbone takes them unchanged. There is no official test
set: train / val / test are one stratified, seeded split (70/10/20 by default). Normalisation
uses the training split's mean and std. Augmentation (off by default) is a small random shift
(random crop with zero padding); never a flip, digits are not mirror-symmetric.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from axes_pipeline.data.base import BaseDataModule, stratified_split
from axes_pipeline.data.settings import DigitsData
from axes_pipeline.errors import UserError


class TensorImageDataset(Dataset):
    """images: [N, C, H, W] float; yields (image [C, H, W], label int)."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray) -> None:
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def digits_images(image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """All 1,797 digits as ``[N, 3, image_size, image_size]`` float32 in [0, 1], and labels ``[N]``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N, 1, 8, 8]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()
    return x, bunch.target.astype(np.int64)


class DigitsDataModule(BaseDataModule):
    """The 8×8 digits of scikit-learn, brought to ``[3, image_size, image_size]``; no ``data_dir``.
    Knobs and defaults: :class:`~axes_pipeline.data.settings.DigitsData`."""

    settings = DigitsData
    name = DigitsData.name
    num_classes = 10  # type: ignore[assignment]
    native_size = 8
    tensor_source = True

    def _configure(self, *, test_fraction: float, **knobs) -> None:
        super()._configure(**knobs)
        self.test_fraction = float(test_fraction)
        if not 0.0 < self.test_fraction < 1.0 or self.val_fraction + self.test_fraction >= 1.0:
            raise UserError(
                f"digits needs 0 < data.test_fraction and data.val_fraction + data.test_fraction < 1, "
                f"got {self.val_fraction} + {self.test_fraction}"
            )

    def layout(self) -> str:
        return "digits ships inside scikit-learn (sklearn.datasets.load_digits); install scikit-learn"

    def _check_present(self) -> None:
        try:
            import sklearn.datasets  # noqa: F401
        except ImportError as err:  # pragma: no cover - scikit-learn is a dependency
            raise UserError(f"cannot import scikit-learn ({err}); {self.layout()}") from err

    def source_names(self) -> tuple[str, ...]:
        return ("all",)

    def _load_source(self, source: str):
        images, labels = digits_images(self.image_size)
        return TensorImageDataset(images, labels), labels

    def _partition(self):
        labels = self._source("all")[1]
        train, val, test = stratified_split(labels, [self.val_fraction, self.test_fraction], self.split_seed)
        return {"train": ("all", train), "val": ("all", val), "test": ("all", test)}

    def _source_tensor(self, source: str) -> torch.Tensor:
        return self._source(source)[0].images

    # The training split's statistics, computed once (loads the data).
    @property
    def mean(self) -> tuple[float, ...]:  # type: ignore[override]
        return self._train_stats[0]

    @property
    def std(self) -> tuple[float, ...]:  # type: ignore[override]
        return self._train_stats[1]

    @cached_property
    def _train_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        source, indices = self.split_indices("train")
        x = self._source(source)[0].images[torch.as_tensor(indices)]  # [n, 3, S, S]
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3))
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
