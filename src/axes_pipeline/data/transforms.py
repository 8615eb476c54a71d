"""Shared image transforms and the normalisation statistics of each dataset.

Two families:

- *crop-style* (digits, CIFAR, Tiny-ImageNet): train = [resize] + random crop with zero padding +
  [horizontal flip] + to-tensor + normalise; eval = [resize] + to-tensor + normalise. The same
  recipe is what :class:`~axes_pipeline.data.device_loader.DeviceBatchLoader` does on the device.
- *ImageNet-style* (ImageNet-100): train = RandomResizedCrop + flip; eval = Resize(256/224 of the
  size) + CenterCrop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torchvision import transforms as T

# Per-channel statistics, RGB order, of pixel values in [0, 1].
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TRANSFORM_MODES = ("train", "eval")


def crop_transform(*, train: bool, image_size: int, native_size: int | None, mean: Sequence[float],
                   std: Sequence[float], crop_padding: int = 0, hflip: bool = False,
                   tensor_input: bool = False) -> Callable:
    """The crop-style pipeline. ``tensor_input``: the dataset already yields float tensors
    ``[C, H, W]`` in [0, 1] at ``image_size`` (digits), so there is no resize and no to-tensor step."""
    steps: list[Callable] = []
    if not tensor_input and native_size is not None and image_size != native_size:
        steps.append(T.Resize((image_size, image_size)))
    if train and crop_padding > 0:
        steps.append(T.RandomCrop(image_size, padding=crop_padding))
    if train and hflip:
        steps.append(T.RandomHorizontalFlip())
    if not tensor_input:
        steps.append(T.ToTensor())
    steps.append(T.Normalize(mean, std))
    return T.Compose(steps)


def imagenet_transform(
    *, train: bool, image_size: int, mean: Sequence[float], std: Sequence[float], hflip: bool = True
) -> Callable:
    """RandomResizedCrop(+flip) for training; Resize(size·256/224) + CenterCrop(size) for eval."""
    if train:
        steps: list[Callable] = [T.RandomResizedCrop(image_size)]
        if hflip:
            steps.append(T.RandomHorizontalFlip())
    else:
        steps = [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
