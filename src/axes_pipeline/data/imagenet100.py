"""ImageNet-100: ImageNet restricted to a 100-class list, in ImageFolder layout.

Either a prepared subset ``<data_dir>/imagenet100/{train,val}/<wnid>/*`` or a full ImageNet
``<data_dir>/imagenet/{train,val}/<wnid>/*`` (val sorted into class folders, as torchvision's
ImageFolder expects); only the listed classes are read. The list defaults to the CMC 100-class
subset shipped as ``imagenet100_classes.txt``; ``class_list`` names another file (one wnid per
line, ``#`` comments) or gives the wnids directly. Labels follow the sorted wnids.
ImageNet's val set is our *test* split; our val split is carved from train.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np
from torchvision.datasets import ImageFolder

from axes_pipeline.data.base import BaseDataModule
from axes_pipeline.data.settings import ImageNet100Data
from axes_pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, imagenet_transform
from axes_pipeline.errors import UserError

CLASS_LIST_FILE = "imagenet100_classes.txt"
ROOT_NAMES = ("imagenet100", "imagenet")


def parse_class_list(text: str) -> list[str]:
    """One wnid per line (or whitespace-separated); blank lines and ``#`` comments ignored."""
    return [w for line in text.splitlines() for w in line.split("#", 1)[0].split()]


def default_class_list() -> list[str]:
    """The shipped CMC ImageNet-100 wnids, in the list's order."""
    return parse_class_list(resources.files("axes_pipeline.data").joinpath(CLASS_LIST_FILE).read_text())


class RestrictedImageFolder(ImageFolder):
    """An ImageFolder that only scans the given class folders (labels = sorted order)."""

    def __init__(self, root: str, wnids: Sequence[str], **kwargs) -> None:
        self._wanted = sorted(wnids)
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str):
        return list(self._wanted), {w: i for i, w in enumerate(self._wanted)}


class ImageNet100DataModule(BaseDataModule):
    """ImageNet-100 at ``image_size`` (224): RandomResizedCrop + flip / Resize(256) + CenterCrop.

    Knobs and defaults: :class:`~axes_pipeline.data.settings.ImageNet100Data`. ``download`` must
    stay false (ImageNet is obtained by hand from image-net.org); ``verify`` and ``crop_padding``
    are unused."""

    settings = ImageNet100Data
    name = ImageNet100Data.name
    native_size = None
    supports_on_device = False
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def _configure(self, *, class_list: str | Sequence[str] | None, **knobs) -> None:
        if knobs["download"]:
            raise UserError(
                "ImageNet cannot be downloaded automatically (data.download=true); get ILSVRC2012 from "
                "image-net.org and " + self._layout_text(knobs["data_dir"])
            )
        super()._configure(**knobs)
        self.class_list = class_list
        self.wnids_listed = self._read_class_list(class_list)

    @staticmethod
    def _read_class_list(class_list) -> list[str]:
        if class_list is None:
            wnids = default_class_list()
        elif isinstance(class_list, (str, Path)):
            path = Path(class_list).expanduser()
            if not path.is_file():
                raise UserError(f"data.class_list file {path} not found; give a file with one wnid per line")
            wnids = parse_class_list(path.read_text())
        else:
            wnids = [str(w) for w in class_list]
        if not wnids:
            raise UserError(f"data.class_list {class_list} lists no classes; give one wnid per line")
        dupes = sorted({w for w in wnids if wnids.count(w) > 1})
        if dupes:
            raise UserError(f"data.class_list repeats wnid(s) {', '.join(dupes)}; list each class once")
        return wnids

    @property
    def wnids(self) -> list[str]:
        """The classes, sorted (label order)."""
        return sorted(self.wnids_listed)

    @property
    def classes(self) -> list[str]:
        return self.wnids

    @property
    def num_classes(self) -> int:
        return len(self.wnids_listed)

    @staticmethod
    def _layout_text(data_dir) -> str:
        base = Path(data_dir).expanduser() if data_dir else "<data_dir>"
        return (
            f"put it at {base}/imagenet100/{{train,val}}/<wnid>/*.JPEG (the listed classes) or a full "
            f"ImageNet at {base}/imagenet/{{train,val}}/<wnid>/*.JPEG (val sorted into class folders)"
        )

    def layout(self) -> str:
        return "expected ImageNet in ImageFolder layout: " + self._layout_text(self.data_dir)

    @cached_property
    def root(self) -> Path:
        """The first of ``<data_dir>/imagenet100``, ``<data_dir>/imagenet`` with train/ and val/."""
        data_dir = self._require_data_dir()
        for name in ROOT_NAMES:
            if (data_dir / name / "train").is_dir() and (data_dir / name / "val").is_dir():
                return data_dir / name
        raise UserError(f"ImageNet-100 not found under {data_dir}: {self.layout()}")

    def _check_present(self) -> None:
        root = self.root
        for split in ("train", "val"):
            absent = [w for w in self.wnids_listed if not (root / split / w).is_dir()]
            if absent:
                raise UserError(
                    f"{root / split} lacks {len(absent)} of the {self.num_classes} listed classes "
                    f"(e.g. {', '.join(absent[:3])}); add them, or restrict data.class_list: {self.layout()}"
                )

    def _load_source(self, source: str):
        folder = self.root / ("train" if source == "train" else "val")
        try:
            dataset = RestrictedImageFolder(str(folder), self.wnids)
        except FileNotFoundError as err:
            raise UserError(f"ImageNet-100 under {folder}: {err}; {self.layout()}") from err
        return dataset, np.asarray(dataset.targets, dtype=np.int64)

    def train_transform(self):
        if not self.augment:
            return self.eval_transform()
        return imagenet_transform(train=True, image_size=self.image_size, mean=self.mean, std=self.std, hflip=self.hflip)

    def eval_transform(self):
        return imagenet_transform(train=False, image_size=self.image_size, mean=self.mean, std=self.std)
