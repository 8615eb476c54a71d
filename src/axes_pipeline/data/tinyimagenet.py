"""Tiny-ImageNet (200 classes, 64×64) in the layout of the official release.

``<data_dir>/tiny-imagenet-200/``::

    wnids.txt                         one wnid per line (200)
    train/<wnid>/images/*.JPEG        500 per class
    val/images/*.JPEG                 10,000
    val/val_annotations.txt           file <TAB> wnid <TAB> x0 <TAB> y0 <TAB> x1 <TAB> y1

The official val set is our *test* split (the test set has no labels); our val split is carved
from train. Labels follow the sorted wnids (as torchvision's ImageFolder would number them).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset
from torchvision.datasets.folder import pil_loader

from axes_pipeline.data.base import BaseDataModule
from axes_pipeline.data.settings import TinyImageNetData
from axes_pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from axes_pipeline.errors import UserError

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_FOLDER = "tiny-imagenet-200"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


class ImageListDataset(Dataset):
    """samples: list of (path, label); yields (PIL RGB image, label) (greyscale files converted)."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return pil_loader(path), label


def read_wnids(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def tiny_train_samples(root: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    samples = []
    for wnid in sorted(class_to_idx):
        folder = root / "train" / wnid / "images"
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        samples.extend((str(p), class_to_idx[wnid]) for p in files)
    return samples


def tiny_val_samples(root: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """The official val images with labels from ``val/val_annotations.txt``, sorted by file name."""
    annotations = root / "val" / "val_annotations.txt"
    samples = []
    for lineno, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise UserError(f"{annotations}:{lineno}: expected 'file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1'")
        fname, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in class_to_idx:
            raise UserError(f"{annotations}:{lineno}: wnid {wnid} is not in wnids.txt; the dataset is inconsistent")
        path = root / "val" / "images" / fname
        if not path.is_file():
            raise UserError(f"{annotations}:{lineno}: image {path} is missing; the dataset is incomplete")
        samples.append((str(path), class_to_idx[wnid]))
    samples.sort()
    return samples


class TinyImageNetDataModule(BaseDataModule):
    """Tiny-ImageNet-200 at 64×64, ImageNet mean/std. Knobs and defaults:
    :class:`~axes_pipeline.data.settings.TinyImageNetData`; ``verify=true`` also requires the full
    200 classes in ``wnids.txt`` (and the archive's md5 when downloading)."""

    settings = TinyImageNetData
    name = TinyImageNetData.name
    title = "Tiny-ImageNet"
    native_size = 64
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    @property
    def root(self) -> Path:
        return self._require_data_dir() / TINY_FOLDER

    def layout(self) -> str:
        where = self.data_dir / TINY_FOLDER if self.data_dir else f"<data_dir>/{TINY_FOLDER}"
        return (
            f"expected {where}/ with wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
            f"val/val_annotations.txt (unzip {TINY_URL} into data_dir, or set data.download=true)"
        )

    def _check_present(self) -> None:
        root = self.root
        needed = [root / "wnids.txt", root / "train", root / "val" / "images", root / "val" / "val_annotations.txt"]
        missing = [str(p.relative_to(root)) for p in needed if not p.exists()]
        if missing:
            raise UserError(f"Tiny-ImageNet not found (missing {', '.join(missing)}): {self.layout()}")
        wnids = self.wnids
        if not wnids:
            raise UserError(f"{root / 'wnids.txt'} lists no classes: {self.layout()}")
        absent = [w for w in wnids if not (root / "train" / w).is_dir()]
        if absent:
            raise UserError(
                f"Tiny-ImageNet is incomplete: no train folder for {len(absent)} wnid(s) of wnids.txt "
                f"(e.g. {absent[0]}): {self.layout()}"
            )
        if self.verify and len(wnids) != 200:
            raise UserError(
                f"{root / 'wnids.txt'} lists {len(wnids)} classes, not 200; re-extract the release, "
                f"or set data.verify=false to use a partial copy"
            )

    def _download(self) -> None:
        self._download_archive(TINY_URL, f"unzip it there (giving {self.root}/)", md5=TINY_MD5 if self.verify else None)

    def _absent(self) -> bool:
        # Only a missing release is downloaded: a partial copy (fewer than 200 classes) keeps its
        # own error instead of a 237 MB download over it.
        return not (self.root / "wnids.txt").is_file()

    @cached_property
    def wnids(self) -> list[str]:
        """The class wnids, sorted (label order)."""
        path = self.root / "wnids.txt"
        if not path.is_file():
            raise UserError(f"Tiny-ImageNet not found (missing wnids.txt): {self.layout()}")
        return sorted(read_wnids(path))

    @property
    def num_classes(self) -> int:
        return len(self.wnids)

    @property
    def classes(self) -> list[str]:
        return list(self.wnids)

    def _load_source(self, source: str):
        class_to_idx = {w: i for i, w in enumerate(self.wnids)}
        if source == "train":
            samples = tiny_train_samples(self.root, class_to_idx)
        else:
            samples = tiny_val_samples(self.root, class_to_idx)
        if not samples:
            raise UserError(f"Tiny-ImageNet {source} images not found under {self.root}: {self.layout()}")
        return ImageListDataset(samples), np.asarray([label for _, label in samples], dtype=np.int64)
