"""CIFAR-10 and CIFAR-100 through torchvision's classes and on-disk format.

Layout: ``<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``<data_dir>/cifar-100-python/{train, test, meta}`` (the "python version" archives of
https://www.cs.toronto.edu/~kriz/cifar.html, which ``data.download=true`` fetches).
``verify=false`` skips torchvision's md5 checks (files only need to exist): for test fixtures or
re-packed copies.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100

from axes_pipeline.data.base import BaseDataModule
from axes_pipeline.data.transforms import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from axes_pipeline.errors import UserError


class _NoChecksumMixin:
    """torchvision CIFAR without the md5 checks: the files need only exist."""

    def _check_integrity(self) -> bool:
        folder = os.path.join(self.root, self.base_folder)
        files = [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        return all(os.path.isfile(os.path.join(folder, f)) for f in files)

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        if not os.path.isfile(path):
            raise RuntimeError(f"Dataset metadata file not found: {path}")
        with open(path, "rb") as infile:
            data = pickle.load(infile, encoding="latin1")
        self.classes = data[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class UnverifiedCIFAR10(_NoChecksumMixin, CIFAR10):
    """:class:`torchvision.datasets.CIFAR10` that does not check md5 sums."""


class UnverifiedCIFAR100(_NoChecksumMixin, CIFAR100):
    """:class:`torchvision.datasets.CIFAR100` that does not check md5 sums."""


class _CifarDataModule(BaseDataModule):
    """Shared CIFAR logic; subclasses name the torchvision classes and the statistics.

    Knobs as :class:`BaseDataModule`; RandomCrop(32, padding=4) + flip by default.
    """

    native_size = 32
    title = "CIFAR"
    dataset_cls: type[CIFAR10] = CIFAR10
    unverified_cls: type[CIFAR10] = UnverifiedCIFAR10

    defaults = dict(image_size=32, crop_padding=4, hflip=True)

    @property
    def folder(self):
        return self._require_data_dir() / self.dataset_cls.base_folder

    def _files(self) -> list[str]:
        cls = self.dataset_cls
        return [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]

    def layout(self) -> str:
        folder = self.dataset_cls.base_folder
        where = self.data_dir / folder if self.data_dir else f"<data_dir>/{folder}"
        return (
            f"expected {where}/{{{','.join(self._files())}}} (the python version from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html); set data.download=true to fetch it, "
            f"or point data.data_dir (paths.data_dir) at the folder that holds {self.dataset_cls.base_folder}/"
        )

    def _check_present(self) -> None:
        folder = self.folder
        missing = [f for f in self._files() if not (folder / f).is_file()]
        if missing:
            raise UserError(f"{self.title} not found (missing {', '.join(missing)}): {self.layout()}")

    def _download(self) -> None:
        root = self._require_data_dir()
        root.mkdir(parents=True, exist_ok=True)
        try:
            self.dataset_cls(str(root), train=True, download=True)
        except Exception as err:  # network errors, bad archives
            raise UserError(
                f"could not download {self.title} into {root} ({err}); download "
                f"{self.dataset_cls.url} yourself and extract it there"
            ) from err

    def _load_source(self, source: str):
        cls = self.dataset_cls if self.verify else self.unverified_cls
        try:
            dataset = cls(str(self._require_data_dir()), train=source == "train", download=False)
        except RuntimeError as err:
            raise UserError(
                f"{self.title} files under {self.folder} fail torchvision's integrity check ({err}); "
                f"delete the folder and set data.download=true, or set data.verify=false for an "
                f"unofficial copy"
            ) from err
        return dataset, np.asarray(dataset.targets, dtype=np.int64)

    def _source_tensor(self, source: str) -> torch.Tensor:
        if self.image_size != self.native_size:
            return super()._source_tensor(source)  # resize with PIL, as the DataLoader path
        data = self._source(source)[0].data  # [N, 32, 32, 3] uint8
        return torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).contiguous()

    @property
    def classes(self) -> list[str]:
        """Class names, in label order."""
        return list(self._source("train")[0].classes)


class Cifar10DataModule(_CifarDataModule):
    """CIFAR-10: 50,000 train (45,000 / 5,000 train/val by default) and 10,000 test images, 32×32."""

    name = "cifar10"
    title = "CIFAR-10"
    mean = CIFAR10_MEAN
    std = CIFAR10_STD
    dataset_cls = CIFAR10
    unverified_cls = UnverifiedCIFAR10
    num_classes = 10  # type: ignore[assignment]


class Cifar100DataModule(_CifarDataModule):
    """CIFAR-100 (fine labels): 50,000 train and 10,000 test images, 32×32, 100 classes."""

    name = "cifar100"
    title = "CIFAR-100"
    mean = CIFAR100_MEAN
    std = CIFAR100_STD
    dataset_cls = CIFAR100
    unverified_cls = UnverifiedCIFAR100
    num_classes = 100  # type: ignore[assignment]
