"""One LightningDataModule per dataset, shared transforms, and the on-device loader.

Build from config with :func:`build_datamodule` (``conf/data/<name>.yaml``). Every module has
``name``, ``num_classes``, ``image_size``, ``in_channels``, ``mean``, ``std``; the Lightning
loaders; and for the analyses ``check()``, ``calibration_set(n, seed, transform)``,
``eval_subset(n, seed)`` and ``loader(dataset)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from axes_pipeline.data.base import BaseDataModule, SplitSubset, stratified_split
from axes_pipeline.data.cifar import Cifar10DataModule, Cifar100DataModule
from axes_pipeline.data.device_loader import DeviceBatchLoader
from axes_pipeline.data.digits import DigitsDataModule
from axes_pipeline.data.imagenet100 import ImageNet100DataModule
from axes_pipeline.data.tinyimagenet import TinyImageNetDataModule
from axes_pipeline.errors import UserError, unknown_name

#: dataset name (the config file under conf/data/) -> DataModule class
DATAMODULES: dict[str, type[BaseDataModule]] = {cls.name: cls for cls in (
    DigitsDataModule, Cifar10DataModule, Cifar100DataModule, TinyImageNetDataModule, ImageNet100DataModule)}


def build_datamodule(data_cfg: Mapping[str, Any]) -> BaseDataModule:
    """Instantiate the DataModule of ``cfg.data`` (``_target_`` + constructor knobs).

    An unknown or missing target, an unknown knob, or a bad value is a :class:`UserError`.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import get_class, instantiate

    target = data_cfg.get("_target_") if hasattr(data_cfg, "get") else None
    pick = f"pick a dataset with data=<{'|'.join(sorted(DATAMODULES))}>"
    if not target:
        raise UserError(f"the data config has no _target_; {pick}")
    try:
        cls = get_class(str(target))
    except Exception:
        valid = [f"axes_pipeline.data.{c.__name__}" for c in DATAMODULES.values()]
        raise unknown_name("data module (_target_)", str(target), valid) from None
    if not (isinstance(cls, type) and issubclass(cls, BaseDataModule)):
        raise UserError(f"data._target_ {target} is not a DataModule of axes_pipeline.data; {pick}")
    try:
        return instantiate(data_cfg)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, TypeError):
            raise UserError(
                f"bad data config for {cls.__name__}: {cause}; "
                f"the knobs: {cls.settings.__module__}.{cls.settings.__name__}"
            ) from None
        raise


__all__ = ["BaseDataModule", "Cifar10DataModule", "Cifar100DataModule", "DATAMODULES", "DeviceBatchLoader",
           "DigitsDataModule", "ImageNet100DataModule", "SplitSubset", "TinyImageNetDataModule", "build_datamodule",
           "stratified_split"]
