"""The typed ``data`` config: one dataclass per dataset, the one source of its knobs' defaults.

``conf/data/<name>.yaml`` selects the dataset's schema (``base_data_<name>``) and wires
``data_dir`` to ``conf/paths``; a DataModule built directly in Python takes the same defaults
(:meth:`BaseDataModule.__init__ <axes_pipeline.data.base.BaseDataModule>`). A dataset has exactly
the keys it reads (digits has no files on disk, so no ``data_dir`` / ``download`` / ``verify``):
every key but the loading ones is part of a result's identity (``runs.data_identity``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from axes_pipeline.bounds import count, fraction, seed_field


@dataclass
class DataRecipe:
    """The dataset's training recipe, read by conf/trainer (epochs) and conf/optim."""

    epochs: int = MISSING


@dataclass
class DataRecipeWithOptimizer(DataRecipe):
    """A recipe that also names the optimizer (it overrides the backbone's recipe)."""

    optimizer: str = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING


@dataclass
class DataConfig:
    """The knobs of every DataModule (see :class:`~axes_pipeline.data.base.BaseDataModule`)."""

    _target_: str = MISSING
    name: str = MISSING
    batch_size: int = count(128)
    eval_batch_size: int = count(256)
    num_workers: int = count(4, least=0)          # loader processes, at most the CPU cores available
    # of the training source; the test set is never used for selection
    val_fraction: float = fraction(0.1, lo_open=True, hi_open=True)
    split_seed: int = seed_field(0)           # the split is fixed independently of the training seed so seeds share it
    on_device: bool = False       # true: keep the data on the GPU and augment there (small datasets)
    image_size: int = count(32)
    augment: bool = True          # random crop (crop_padding) + horizontal flip (hflip) on the train split
    crop_padding: int = count(4, least=0)
    hflip: bool = True
    recipe: DataRecipe = MISSING


@dataclass
class FileDataConfig(DataConfig):
    """A dataset read from files below ``data_dir``."""

    data_dir: str | None = None   # conf/data/*.yaml: ${paths.data_dir}
    download: bool = True            # fetched into data_dir when missing (one-line error offline); false: must be there
    verify: bool = True              # md5 check of the files (CIFAR) / all classes present (Tiny-ImageNet)


@dataclass
class DigitsData(DataConfig):
    """scikit-learn's bundled 8x8 digits, resized to 3x16x16; split 70/10/20 (no official test set)."""

    _target_: str = "axes_pipeline.data.DigitsDataModule"
    name: str = "digits"
    batch_size: int = 64
    num_workers: int = 0          # the data is one small in-memory tensor
    test_fraction: float = fraction(0.2, lo_open=True, hi_open=True)    # carved with the same stratified, seeded split as val
    image_size: int = 16
    augment: bool = False         # true: random shift (crop with zero padding); never flips for digits
    crop_padding: int = 2
    hflip: bool = False
    # Ours: the source has no digits run.
    recipe: DataRecipe = field(default_factory=lambda: DataRecipe(epochs=20))


@dataclass
class Cifar10Data(FileDataConfig):
    """CIFAR-10: RandomCrop(32, padding=4) + RandomHorizontalFlip; val 5,000 of the 50,000 training images."""

    _target_: str = "axes_pipeline.data.Cifar10DataModule"
    name: str = "cifar10"
    # METHODS §10: CIFAR-10 stress test, 50 epochs.
    recipe: DataRecipe = field(default_factory=lambda: DataRecipe(epochs=50))


@dataclass
class Cifar100Data(FileDataConfig):
    """CIFAR-100 (fine labels), as CIFAR-10."""

    _target_: str = "axes_pipeline.data.Cifar100DataModule"
    name: str = "cifar100"
    # METHODS §10: 100 epochs.
    recipe: DataRecipe = field(default_factory=lambda: DataRecipe(epochs=100))


@dataclass
class TinyImageNetData(FileDataConfig):
    """Tiny-ImageNet-200 (64x64): RandomCrop(64, padding=8) + flip; the official val set is our test split."""

    _target_: str = "axes_pipeline.data.TinyImageNetDataModule"
    name: str = "tinyimagenet"
    image_size: int = 64
    crop_padding: int = 8
    # METHODS §10: 50 epochs, Adam 1e-3; weight decay is not given by the source: ours, as ImageNet-100's.
    recipe: DataRecipe = field(default_factory=lambda: DataRecipeWithOptimizer(
        epochs=50, optimizer="adam", lr=1.0e-3, weight_decay=1.0e-4))


@dataclass
class ImageNet100Data(FileDataConfig):
    """ImageNet-100 at 224: RandomResizedCrop(224) + flip for train, Resize(256) + CenterCrop(224) for eval.
    Never on the device (too large); ``verify`` is unused (an ImageFolder copy has no official checksums)."""

    _target_: str = "axes_pipeline.data.ImageNet100DataModule"
    name: str = "imagenet100"
    download: bool = False        # ImageNet cannot be downloaded automatically
    # null: the CMC 100-class list shipped in axes_pipeline/data/imagenet100_classes.txt; a list
    # file's path; or a list of wnids
    class_list: Any = None
    batch_size: int = 64
    eval_batch_size: int = 128
    num_workers: int = 8
    image_size: int = 224
    crop_padding: int = 0         # unused (ImageNet-style transforms)
    # METHODS §10: 30 epochs, Adam 1e-3, wd 1e-4.
    recipe: DataRecipe = field(default_factory=lambda: DataRecipeWithOptimizer(
        epochs=30, optimizer="adam", lr=1.0e-3, weight_decay=1.0e-4))


#: every dataset's schema, stored as ``data/base_data_<name>``
DATASETS: tuple[type[DataConfig], ...] = (DigitsData, Cifar10Data, Cifar100Data, TinyImageNetData, ImageNet100Data)

