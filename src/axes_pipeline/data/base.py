"""The common base of every DataModule: splits, transforms, loaders, and what the analyses need.

A dataset has one or two *sources* on disk (``"train"`` and ``"test"``; digits has one, ``"all"``).
The base carves three *splits* from them: ``train`` (what the network is fit on); ``val``, a fixed,
stratified, seeded part of the training source (``val_fraction``, ``split_seed``) used for every
selection (checkpoints, hyper-parameters); and ``test``, the official test set, never used for
selection. The split depends only on ``split_seed``, so runs with different seeds share it.
Analyses draw from it with :meth:`BaseDataModule.calibration_set` (training portion) and
:meth:`BaseDataModule.eval_subset` (test split); both are nested in ``n`` for a fixed seed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from axes_pipeline.data.device_loader import DeviceBatchLoader, default_device
from axes_pipeline.data.settings import DataConfig
from axes_pipeline.data.transforms import TRANSFORM_MODES, crop_transform
from axes_pipeline.errors import UserError

SPLITS = ("train", "val", "test")

log = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else all)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def loader_workers(requested: int) -> int:
    """DataLoader workers for ``data.num_workers=requested``, at most the cores available: more only
    wait for a core (and torch warns), so a config written for a large node still runs on a laptop."""
    return min(int(requested), available_cpus())


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split positions ``0..N-1`` by class into ``[rest, part_1, ..., part_k]``.

    ``part_j`` holds ``round(fractions[j] * N)`` positions, spread over classes in proportion to
    their sizes (largest remainder), each class shuffled with one seeded generator. Every part is
    returned sorted. Deterministic in ``(labels, fractions, seed)``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = []
    for frac in fractions:
        total = int(round(frac * n))
        exact = counts * frac
        quota = np.floor(exact).astype(int)
        order = np.argsort(-(exact - quota), kind="stable")
        quota[order[: total - quota.sum()]] += 1
        quotas.append(quota)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for ci, cls in enumerate(classes):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        start = 0
        for j, quota in enumerate(quotas):
            take = min(int(quota[ci]), len(idx) - start)
            parts[j + 1].append(idx[start : start + take])
            start += take
        parts[0].append(idx[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


class SplitSubset(Dataset):
    """Rows ``indices`` of a source dataset (untransformed PIL images, or float tensors for digits),
    transformed on the fly. ``source_name`` / ``mode`` let :meth:`BaseDataModule.loader` serve the
    same rows from the on-device copy."""

    def __init__(self, source: Dataset, indices: Sequence[int], transform: Callable | None, *,
                 source_name: str, mode: str, labels: np.ndarray) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.source_name = source_name
        self.mode = mode
        self.targets = np.asarray(labels)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image, label = self.source[int(self.indices[i])]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(label)


class BaseDataModule(L.LightningDataModule):
    """Common behaviour of the dataset modules; subclasses describe their data on disk.

    Subclasses set ``settings``, ``name``, ``mean``, ``std``, ``native_size`` and implement
    :meth:`_check_present`, :meth:`_load_source`, and (when downloadable) :meth:`_download`.

    Constructor knobs: the fields of the dataset's typed config (:attr:`settings`, where each
    knob's default and meaning live), so a module built in Python takes the defaults of
    ``data=<name>``. Kept as attributes of the same names; ``recipe`` as a dict.
    """

    name: str = "base"     # a dataset's module: ``name = <its settings>.name``
    title: str = "base"    # the dataset as messages name it
    in_channels: int = 3
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    #: side of the images as stored (None: variable, e.g. ImageNet)
    native_size: int | None = None
    #: the data can live on the accelerator (small datasets only)
    supports_on_device: bool = True
    #: sources yield float tensors at ``image_size`` instead of PIL images
    tensor_source: bool = False
    #: the dataset's typed config: its knobs and their defaults
    settings: ClassVar[type[DataConfig]]

    def __init__(self, **knobs: Any) -> None:
        super().__init__()
        defaults = {k: v for k, v in asdict(self.settings()).items() if k != "_target_"}
        unknown = sorted(set(knobs) - set(defaults))
        if unknown:
            raise UserError(
                f"unknown data knob(s) {', '.join(unknown)} for {type(self).__name__}; valid: {', '.join(defaults)}"
            )
        self._configure(**{**defaults, **knobs})

    def _configure(self, *, name: str, batch_size: int, eval_batch_size: int, num_workers: int,
                   val_fraction: float, split_seed: int, on_device: bool, image_size: int, augment: bool,
                   crop_padding: int, hflip: bool, recipe: Mapping[str, Any],
                   # only datasets read from files have these (FileDataConfig); digits has none
                   data_dir: str | Path | None = None, download: bool = False, verify: bool = True) -> None:
        if name != type(self).name:
            raise UserError(
                f"data.name '{name}' does not match {type(self).__name__} (name '{type(self).name}'); "
                f"pick the dataset with data={name} instead of editing data.name"
            )
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else None
        self.download = bool(download)
        self.verify = bool(verify)
        self.batch_size = _int_at_least(1, "batch_size", batch_size)
        self.eval_batch_size = _int_at_least(1, "eval_batch_size", eval_batch_size)
        self.num_workers = _int_at_least(0, "num_workers", num_workers)
        if loader_workers(self.num_workers) < self.num_workers:
            log.info("data.num_workers=%d: using %d loader workers (the CPU cores available)",
                     self.num_workers, loader_workers(self.num_workers))
        self.val_fraction = float(val_fraction)
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.split_seed = int(split_seed)
        self.on_device = bool(on_device)
        self.image_size = _int_at_least(1, "image_size", image_size)
        self.augment = bool(augment)
        self.crop_padding = _int_at_least(0, "crop_padding", crop_padding)
        self.hflip = bool(hflip)
        if isinstance(recipe, DictConfig):
            recipe = OmegaConf.to_container(recipe, resolve=True)
        self.recipe: dict[str, Any] = dict(recipe or {})
        if self.on_device and not self.supports_on_device:
            raise UserError(
                f"data.on_device=true is for small datasets (digits, cifar10, cifar100, tinyimagenet), "
                f"not {self.name}; set data.on_device=false"
            )
        self._sources: dict[str, tuple[Dataset, np.ndarray]] = {}
        self._splits: dict[str, tuple[str, np.ndarray]] | None = None
        self._device_data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def layout(self) -> str:
        """One line: where the data must be on disk and how to get it."""
        return ""

    def _check_present(self) -> None:
        """Raise UserError (with :meth:`layout`) unless the files are there. Cheap."""
        raise NotImplementedError

    def _load_source(self, source: str) -> tuple[Dataset, np.ndarray]:
        """The untransformed source dataset and its labels ``[N]``."""
        raise NotImplementedError

    def _download(self) -> None:
        raise UserError(f"{self.name} cannot be downloaded automatically; {self.layout()}")

    def _download_archive(self, url: str, then: str, **archive: Any) -> None:
        """Fetch and extract ``url`` into ``data_dir``; offline or a bad archive is one line that
        says what to do by hand (``then``, after fetching the file elsewhere)."""
        from torchvision.datasets.utils import download_and_extract_archive

        root = self._require_data_dir()
        root.mkdir(parents=True, exist_ok=True)
        try:
            download_and_extract_archive(url, str(root), **archive)
        except Exception as err:  # noqa: BLE001 - offline (URLError/OSError), bad archive
            raise UserError(f"could not download {self.title} from {url} into {root} ({first_line(err)}); "
                            f"without network, fetch that file elsewhere and {then}") from None

    def source_names(self) -> tuple[str, ...]:
        return ("train", "test")

    def _partition(self) -> dict[str, tuple[str, np.ndarray]]:
        """Split name -> (source name, row indices). Default: val carved from train; test whole."""
        labels = self._source("train")[1]
        train, val = stratified_split(labels, [self.val_fraction], self.split_seed)
        test_n = len(self._source("test")[1])
        return {"train": ("train", train), "val": ("train", val), "test": ("test", np.arange(test_n))}

    def train_transform(self) -> Callable:
        return self._crop_transform(train=self.augment)

    def eval_transform(self) -> Callable:
        return self._crop_transform(train=False)

    def _crop_transform(self, train: bool) -> Callable:
        return crop_transform(train=train, image_size=self.image_size, native_size=self.native_size, mean=self.mean,
                              std=self.std, crop_padding=self.crop_padding, hflip=self.hflip,
                              tensor_input=self.tensor_source)

    def _require_data_dir(self) -> Path:
        if self.data_dir is None:
            raise UserError(f"data.data_dir is not set for {self.name}; {self.layout()}")
        return self.data_dir

    def check(self) -> None:
        """Validate, cheaply, that the data exists (or will be downloaded), before any expensive work."""
        if self.download:
            self._require_data_dir()
            if self._absent():
                return       # prepare_data fetches it
        self._check_present()

    def _absent(self) -> bool:
        """Whether the data is missing on disk (what ``download`` fetches)."""
        try:
            self._check_present()
        except UserError:
            return True
        return False

    def prepare_data(self) -> None:
        """Download when ``download`` is set and the data is missing (Lightning: rank 0 only)."""
        if self.download and self._absent():
            self._download()

    def setup(self, stage: str | None = None) -> None:
        """Load the sources and compute the split (idempotent)."""
        if self._splits is not None:
            return
        self._check_present()
        for name in self.source_names():
            self._source(name)
        self._splits = self._partition()

    def _source(self, source: str) -> tuple[Dataset, np.ndarray]:
        if source not in self._sources:
            dataset, labels = self._load_source(source)
            self._sources[source] = (dataset, np.asarray(labels, dtype=np.int64))
        return self._sources[source]

    def split_indices(self, split: str) -> tuple[str, np.ndarray]:
        """``(source name, row indices)`` of a split."""
        if split not in SPLITS:
            raise UserError(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")
        if self._splits is None:
            self.prepare_data()
            self.setup()
        return self._splits[split]

    def split_sizes(self) -> dict[str, int]:
        return {s: len(self.split_indices(s)[1]) for s in SPLITS}

    def transform(self, mode: str) -> Callable:
        if mode not in TRANSFORM_MODES:
            raise UserError(f"unknown transform '{mode}'; choose one of: {', '.join(TRANSFORM_MODES)}")
        return self.train_transform() if mode == "train" else self.eval_transform()

    def _subset(self, source: str, indices: np.ndarray, mode: str) -> SplitSubset:
        dataset, labels = self._source(source)
        return SplitSubset(dataset, indices, self.transform(mode), source_name=source, mode=mode, labels=labels)

    def dataset(self, split: str, transform: str | None = None) -> SplitSubset:
        """A split as a Dataset of ``(x: [C, H, W] float, y: int)``; ``transform`` (``"train"`` |
        ``"eval"``) defaults to the split's own."""
        source, indices = self.split_indices(split)
        mode = transform or ("train" if split == "train" else "eval")
        return self._subset(source, indices, mode)

    def calibration_set(self, n: int, seed: int, transform: str = "eval") -> SplitSubset:
        """``n`` images drawn (seeded) from the training portion (never val or test); nested in ``n``."""
        self.transform(transform)  # validate the name before loading anything
        source, indices = self.split_indices("train")
        return self._subset(source, _draw(indices, n, seed, what=f"{self.name} training portion"), transform)

    def eval_subset(self, n: int | None, seed: int) -> SplitSubset:
        """``n`` images drawn (seeded) from the test split, eval transform; ``None`` = all, in order."""
        source, indices = self.split_indices("test")
        if n is not None:
            indices = _draw(indices, n, seed, what=f"{self.name} test split")
        return self._subset(source, indices, "eval")

    def train_dataloader(self):
        return self._make_loader(self.dataset("train"), shuffle=True, batch_size=self.batch_size, persistent=True)

    def val_dataloader(self):
        return self._make_loader(self.dataset("val"), shuffle=False, batch_size=self.eval_batch_size, persistent=True)

    def test_dataloader(self):
        return self._make_loader(self.dataset("test"), shuffle=False, batch_size=self.eval_batch_size, persistent=True)

    def loader(self, dataset: Dataset, shuffle: bool = False, batch_size: int | None = None):
        """A loader over ``dataset`` (default batch size: ``eval_batch_size``): a
        :class:`DeviceBatchLoader` with ``on_device`` and a dataset of this module, else a DataLoader."""
        return self._make_loader(dataset, shuffle=shuffle, batch_size=batch_size or self.eval_batch_size,
                                 persistent=False)

    def _make_loader(self, dataset: Dataset, *, shuffle: bool, batch_size: int, persistent: bool):
        if self.on_device and isinstance(dataset, SplitSubset):
            return self.device_loader(dataset, shuffle=shuffle, batch_size=batch_size)
        workers = loader_workers(self.num_workers)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                          persistent_workers=persistent and workers > 0, pin_memory=torch.cuda.is_available(),
                          drop_last=False)

    def device_loader(
        self, dataset: SplitSubset, *, shuffle: bool = False, batch_size: int | None = None, seed: int | None = None
    ) -> DeviceBatchLoader:
        """The :class:`DeviceBatchLoader` serving ``dataset``'s rows with its transform mode."""
        images, labels = self._device_source(dataset.source_name)
        train = dataset.mode == "train" and self.augment
        return DeviceBatchLoader(images, labels, batch_size or self.eval_batch_size,
                                 indices=torch.as_tensor(dataset.indices), shuffle=shuffle,
                                 crop_padding=self.crop_padding if train else 0, hflip=self.hflip if train else False,
                                 mean=self.mean, std=self.std, seed=seed, device=images.device)

    def _device_source(self, source: str) -> tuple[torch.Tensor, torch.Tensor]:
        if source not in self._device_data:
            images = self._source_tensor(source)
            labels = torch.as_tensor(self._source(source)[1], dtype=torch.long)
            self._device_data[source] = (images.to(default_device()), labels.to(default_device()))
        return self._device_data[source]

    def _source_tensor(self, source: str) -> torch.Tensor:
        """A whole source as ``[N, C, H, W]`` uint8 at ``image_size``, decoded (and resized) once with
        PIL as the DataLoader path does. Subclasses with the pixels already in memory override it."""
        from torchvision import transforms as T

        dataset, labels = self._source(source)
        steps = []
        if self.native_size is None or self.image_size != self.native_size:
            steps.append(T.Resize((self.image_size, self.image_size)))
        steps.append(T.PILToTensor())
        subset = SplitSubset(dataset, np.arange(len(dataset)), T.Compose(steps), source_name=source, mode="eval",
                             labels=labels)
        loader = DataLoader(subset, batch_size=512, num_workers=loader_workers(self.num_workers))
        return torch.cat([x for x, _ in loader])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(data_dir={self.data_dir}, image_size={self.image_size}, on_device={self.on_device})"


def first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _draw(indices: np.ndarray, n: int, seed: int, *, what: str) -> np.ndarray:
    n = int(n)
    if n < 1:
        raise UserError(f"asked for {n} images from the {what}; ask for at least 1")
    if n > len(indices):
        raise UserError(f"asked for {n} images but the {what} has only {len(indices)}; lower the number (e.g. n_cal)")
    order = np.random.default_rng(seed).permutation(len(indices))
    return indices[order[:n]]


def _int_at_least(least: int, key: str, value: Any) -> int:
    if int(value) != value or int(value) < least:
        raise UserError(f"data.{key} must be a {'positive' if least else 'non-negative'} integer, got {value}")
    return int(value)
