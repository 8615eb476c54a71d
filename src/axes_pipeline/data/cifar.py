"""CIFAR-10 and CIFAR-100 in torchvision's on-disk format, read without running pickled code.

Layout: ``<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``<data_dir>/cifar-100-python/{train, test, meta}`` (the "python version" archives of
https://www.cs.toronto.edu/~kriz/cifar.html, fetched when missing unless ``data.download=false``).
``verify=false`` skips torchvision's md5 checks: for test fixtures or re-packed copies.

The batches are pickles, and ``pickle.load`` runs whatever callable a file names (an md5 check
guards nothing once ``verify=false``). Every CIFAR file is therefore read with
:class:`CifarUnpickler`, which builds plain containers, numbers, strings and numpy arrays only.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100, VisionDataset
from torchvision.datasets import utils as tv_utils

from axes_pipeline.data.base import BaseDataModule, first_line
from axes_pipeline.data.settings import Cifar10Data, Cifar100Data
from axes_pipeline.data.transforms import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from axes_pipeline.errors import UserError

_NP_CORE = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core


def _latin1_encode(text: Any, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles ``bytes`` at protocol ≤ 2, restricted to that use."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed on a str with latin1")
    return text.encode("latin1")


class CifarUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR batches: pickle's own containers, numbers and strings plus numpy arrays,
    dtypes and scalars. Any other global a file names is refused, so no code from the file runs."""

    ALLOWED: dict[tuple[str, str], Any] = {
        **{(mod, "_reconstruct"): _NP_CORE.multiarray._reconstruct
           for mod in ("numpy.core.multiarray", "numpy._core.multiarray")},
        **{(mod, "scalar"): _NP_CORE.multiarray.scalar for mod in ("numpy.core.multiarray", "numpy._core.multiarray")},
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def read_cifar_pickle(path: str | os.PathLike) -> dict:
    """A CIFAR batch or meta file as a dict (str keys, as torchvision reads them with latin1); a
    one-line :class:`UserError` when it is not a plain pickled dict (or names another callable)."""
    try:
        with open(path, "rb") as f:
            obj = CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, UnicodeDecodeError, MemoryError) as err:
        raise UserError(
            f"{path} is not a plain CIFAR pickle ({first_line(err)}); refusing to read it: delete the folder and "
            f"set data.download=true, or restore the official files"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a CIFAR dict; restore the official files")
    return obj


def _batch_arrays(path: str, entry: dict) -> tuple[np.ndarray, list[int]]:
    data = entry.get("data")
    labels = entry.get("labels", entry.get("fine_labels"))
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072
            or not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data)):
        raise UserError(f"{path} is not a CIFAR batch (needs 'data' uint8 [N, 3072] and N labels); "
                        "restore the official files")
    return data, [int(v) for v in labels]


class _SafeCifarMixin:
    """torchvision's CIFAR dataset with every file read by :func:`read_cifar_pickle`.

    Same attributes as torchvision's (``data [N, 32, 32, 3]`` uint8, ``targets``, ``classes``);
    ``verify=False`` skips torchvision's md5 checks (the files need only exist)."""

    def __init__(self, root, train: bool = True, transform=None, target_transform=None, verify: bool = True) -> None:
        VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)
        self.train = train
        self.verify = verify
        if not self._check_integrity():
            raise RuntimeError("Dataset not found or corrupted (md5 check)")
        data, targets = [], []
        for file_name, _ in self.train_list if train else self.test_list:
            path = os.path.join(self.root, self.base_folder, file_name)
            batch, labels = _batch_arrays(path, read_cifar_pickle(path))
            data.append(batch)
            targets.extend(labels)
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # HWC, as torchvision
        self.targets = targets
        self._load_meta()

    def _check_integrity(self) -> bool:
        folder = os.path.join(self.root, self.base_folder)
        files = list(self.train_list) + list(self.test_list)
        if not self.verify:
            return all(os.path.isfile(os.path.join(folder, f)) for f, _ in files)
        return all(tv_utils.check_integrity(os.path.join(folder, f), md5) for f, md5 in files)

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        if not os.path.isfile(path) or (self.verify and not tv_utils.check_integrity(path, self.meta["md5"])):
            raise RuntimeError(f"Dataset metadata file not found or corrupted: {path}")
        names = read_cifar_pickle(path).get(self.meta["key"])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UserError(f"{path} has no list of class names under '{self.meta['key']}'; restore the official files")
        self.classes = names
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class SafeCIFAR10(_SafeCifarMixin, CIFAR10):
    """:class:`torchvision.datasets.CIFAR10` read with :class:`CifarUnpickler`."""


class SafeCIFAR100(_SafeCifarMixin, CIFAR100):
    """:class:`torchvision.datasets.CIFAR100` read with :class:`CifarUnpickler`."""


class _CifarDataModule(BaseDataModule):
    """Shared CIFAR logic; subclasses name the torchvision class and the statistics. Knobs and
    defaults: :class:`~axes_pipeline.data.settings.Cifar10Data` / ``Cifar100Data``."""

    native_size = 32
    title = "CIFAR"
    dataset_cls: type[CIFAR10] = SafeCIFAR10

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
        # the archive only: the batches are read later, by the safe reader
        cls = self.dataset_cls
        self._download_archive(cls.url, f"extract it into {self._require_data_dir()}", filename=cls.filename,
                               md5=cls.tgz_md5)

    def _load_source(self, source: str):
        try:
            dataset = self.dataset_cls(str(self._require_data_dir()), train=source == "train", verify=self.verify)
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

    settings = Cifar10Data
    name = Cifar10Data.name
    title = "CIFAR-10"
    mean = CIFAR10_MEAN
    std = CIFAR10_STD
    dataset_cls = SafeCIFAR10
    num_classes = 10  # type: ignore[assignment]


class Cifar100DataModule(_CifarDataModule):
    """CIFAR-100 (fine labels): 50,000 train and 10,000 test images, 32×32, 100 classes."""

    settings = Cifar100Data
    name = Cifar100Data.name
    title = "CIFAR-100"
    mean = CIFAR100_MEAN
    std = CIFAR100_STD
    dataset_cls = SafeCIFAR100
    num_classes = 100  # type: ignore[assignment]
