"""DataModules on small fake data written in the real on-disk formats (no downloads, CPU only)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from axes_pipeline.data import (
    DATAMODULES,
    Cifar10DataModule,
    Cifar100DataModule,
    DeviceBatchLoader,
    DigitsDataModule,
    ImageNet100DataModule,
    TinyImageNetDataModule,
    build_datamodule,
    stratified_split,
)
from axes_pipeline.data.imagenet100 import default_class_list
from axes_pipeline.errors import UserError

from .helpers import _dump_py2, make_cfg, write_cifar10, write_cifar100

# Solid colours per class survive JPEG well enough to read the class back from the pixels.
COLOURS = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (250, 250, 10)]


def _jpeg(path: Path, colour, size=(64, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG", quality=95)


def _class_of(x: torch.Tensor, mean, std) -> int:
    """x: [3, H, W] normalised -> the index of the nearest class colour."""
    rgb = (x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).mean(dim=(1, 2)) * 255
    return int(np.argmin([np.abs(rgb.numpy() - np.asarray(c)).sum() for c in COLOURS]))


TINY_WNIDS = ["n09999999", "n01443537", "n02000000"]  # deliberately unsorted in wnids.txt


def write_tiny(root: Path, per_class: int = 6) -> Path:
    """Tiny-ImageNet release layout; the colour of every image is COLOURS[label] (sorted wnids)."""
    base = root / "tiny-imagenet-200"
    label = {w: i for i, w in enumerate(sorted(TINY_WNIDS))}
    (base).mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    for w in TINY_WNIDS:
        for k in range(per_class):
            _jpeg(base / "train" / w / "images" / f"{w}_{k}.JPEG", COLOURS[label[w]])
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for k in range(9):
        w = TINY_WNIDS[(k * 2) % 3]
        _jpeg(base / "val" / "images" / f"val_{k}.JPEG", COLOURS[label[w]])
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def write_imagenet(root: Path, folder: str, wnids, n_train: int = 5, n_val: int = 2) -> None:
    """ImageFolder layout; the colour of each image is COLOURS[position of its wnid in sorted(wnids)]."""
    for i, w in enumerate(sorted(wnids)):
        for k in range(n_train):
            _jpeg(root / folder / "train" / w / f"{w}_{k}.JPEG", COLOURS[i], size=(48 + k, 40))
        for k in range(n_val):
            _jpeg(root / folder / "val" / w / f"ILSVRC2012_val_{i}{k}.JPEG", COLOURS[i], size=(40, 44))


# --------------------------------------------------------------------------- digits and splits
def test_digits_shapes_classes_and_deterministic_split():
    dm = DigitsDataModule(image_size=16, split_seed=0)
    dm.check()
    assert (dm.name, dm.num_classes, dm.image_size, dm.in_channels) == ("digits", 10, 16, 3)
    sizes = dm.split_sizes()
    assert sizes == {"train": 1258, "val": 180, "test": 359} and sum(sizes.values()) == 1797
    _, tr = dm.split_indices("train")
    _, va = dm.split_indices("val")
    _, te = dm.split_indices("test")
    assert len(np.intersect1d(tr, va)) == len(np.intersect1d(tr, te)) == len(np.intersect1d(va, te)) == 0
    # stratified: every class in every split in proportion
    labels = dm._source("all")[1]
    for idx, frac in ((va, 0.1), (te, 0.2)):
        counts = np.bincount(labels[idx], minlength=10)
        assert np.all(np.abs(counts - frac * np.bincount(labels)) <= 1.0)
    # same split_seed -> same split; another seed -> another split
    again = DigitsDataModule(split_seed=0)
    assert np.array_equal(again.split_indices("val")[1], va)
    assert not np.array_equal(DigitsDataModule(split_seed=1).split_indices("val")[1], va)
    # batches: [B, 3, 16, 16], normalised with the training split's statistics
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    train_eval = torch.stack([dm.dataset("train", "eval")[i][0] for i in range(len(tr))])
    assert abs(train_eval.mean().item()) < 1e-4 and abs(train_eval.std().item() - 1) < 1e-3
    assert torch.equal(train_eval[:, 0], train_eval[:, 2])  # grey repeated over 3 channels
    # digits are never flipped, even with augmentation on
    aug = DigitsDataModule(augment=True)
    names = [type(t).__name__ for t in aug.train_transform().transforms]
    assert "RandomCrop" in names and "RandomHorizontalFlip" not in names


def test_stratified_split_counts_and_determinism():
    labels = np.repeat(np.arange(3), [10, 20, 30])
    rest, val = stratified_split(labels, [0.1], seed=3)
    assert len(val) == 6 and np.array_equal(np.bincount(labels[val]), [1, 2, 3])
    assert len(rest) + len(val) == 60 and len(np.intersect1d(rest, val)) == 0
    assert np.array_equal(stratified_split(labels, [0.1], seed=3)[1], val)
    with pytest.raises(UserError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.2)


def test_calibration_set_and_eval_subset():
    dm = DigitsDataModule()
    _, train = dm.split_indices("train")
    _, val = dm.split_indices("val")
    _, test = dm.split_indices("test")
    cal = dm.calibration_set(200, seed=7)
    assert len(cal) == 200 and np.array_equal(cal.indices, dm.calibration_set(200, seed=7).indices)
    assert np.isin(cal.indices, train).all() and not np.isin(cal.indices, val).any()
    assert not np.array_equal(np.sort(cal.indices), np.sort(dm.calibration_set(200, seed=8).indices))
    assert np.array_equal(dm.calibration_set(50, seed=7).indices, cal.indices[:50])  # nested in n
    assert cal.mode == "eval" and dm.calibration_set(10, seed=7, transform="train").mode == "train"
    x, y = next(iter(dm.loader(cal)))
    assert x.shape == (200, 3, 16, 16) and torch.equal(y, torch.as_tensor(cal.targets))
    with pytest.raises(UserError, match=r"5000.*1258"):
        dm.calibration_set(5000, seed=0)
    with pytest.raises(UserError, match="transform"):
        dm.calibration_set(10, seed=0, transform="weird")

    assert np.array_equal(dm.eval_subset(None, seed=0).indices, test)
    sub = dm.eval_subset(100, seed=1)
    assert len(sub) == 100 and np.isin(sub.indices, test).all()
    assert np.array_equal(sub.indices, dm.eval_subset(100, seed=1).indices)
    with pytest.raises(UserError, match="359"):
        dm.eval_subset(1000, seed=0)


# --------------------------------------------------------------------------- CIFAR
def test_cifar100_real_format(tmp_path):
    written = write_cifar100(tmp_path)
    dm = Cifar100DataModule(data_dir=str(tmp_path), verify=False, num_workers=0, val_fraction=0.25,
                            batch_size=8, eval_batch_size=7)
    dm.check()
    assert (dm.num_classes, dm.image_size, dm.mean) == (100, 32, (0.5071, 0.4867, 0.4408))
    assert dm.split_sizes() == {"train": 45, "val": 15, "test": 20}
    assert dm.classes[:2] == ["fine_0", "fine_1"]
    test = dm.dataset("test")
    assert np.array_equal(test.targets, written["test"][1])
    # pixels: the eval transform is ToTensor + Normalize of the written image
    data = written["test"][0][3].reshape(3, 32, 32).astype(np.float32) / 255
    expected = (torch.from_numpy(data) - torch.tensor(dm.mean).view(3, 1, 1)) / torch.tensor(dm.std).view(3, 1, 1)
    x, y = test[3]
    assert torch.allclose(x, expected, atol=1e-6) and y == written["test"][1][3]
    source, train_idx = dm.split_indices("train")
    assert np.array_equal(dm.dataset("train").targets, written["train"][1][train_idx])
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (8, 3, 32, 32) and yb.max() < 100
    assert len(dm.test_dataloader()) == 3
    # the official files would pass torchvision's md5 check; these do not
    with pytest.raises(UserError, match="verify=false"):
        Cifar100DataModule(data_dir=str(tmp_path), verify=True, num_workers=0).setup()


def test_cifar10_real_format_and_on_device_matches(tmp_path):
    written = write_cifar10(tmp_path)
    dm = Cifar10DataModule(data_dir=str(tmp_path), verify=False, num_workers=0, val_fraction=0.2, eval_batch_size=8)
    dm.check()
    assert dm.num_classes == 10 and dm.classes[0] == "airplane"
    assert dm.split_sizes() == {"train": 48, "val": 12, "test": 20}
    source, idx = dm.split_indices("val")
    assert np.array_equal(dm.dataset("val").targets, written["train"][1][idx])
    # on_device eval batches equal the DataLoader path's eval batches
    dev = Cifar10DataModule(data_dir=str(tmp_path), verify=False, num_workers=0, val_fraction=0.2,
                            eval_batch_size=8, on_device=True)
    for a, b in ((dm.test_dataloader(), dev.test_dataloader()), (dm.val_dataloader(), dev.val_dataloader())):
        assert isinstance(b, DeviceBatchLoader) and len(a) == len(b)
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.allclose(xa, xb, atol=1e-6) and torch.equal(ya, yb)
    cal_a, cal_b = dm.calibration_set(10, seed=3), dev.calibration_set(10, seed=3)
    (xa, ya), (xb, yb) = next(iter(dm.loader(cal_a))), next(iter(dev.loader(cal_b)))
    assert torch.allclose(xa, xb, atol=1e-6) and torch.equal(ya, yb)
    # at another image_size both paths resize with PIL, so they still agree
    small = dict(data_dir=str(tmp_path), verify=False, num_workers=0, image_size=16, eval_batch_size=32)
    (xa, ya), (xb, yb) = (next(iter(Cifar10DataModule(**small, on_device=d).test_dataloader())) for d in (False, True))
    assert xa.shape == (20, 3, 16, 16) and torch.allclose(xa, xb, atol=1e-6) and torch.equal(ya, yb)
    train = dev.train_dataloader()
    assert train.shuffle and train.crop_padding == 4 and train.hflip
    xb, yb = next(iter(train))
    assert xb.shape == (48, 3, 32, 32)


class _RunsCode:
    """Unpickling this calls os.system: what a crafted CIFAR file could do with plain pickle.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("target", ["train", "meta"])
def test_cifar_pickle_that_runs_code_is_refused(tmp_path, target):
    write_cifar100(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-100-python" / target
    payload = {b"data": _RunsCode(marker)} if target == "train" else {b"fine_label_names": [_RunsCode(marker)]}
    _dump_py2(path, payload)
    assert b"system" in path.read_bytes()          # the file really names os.system
    dm = Cifar100DataModule(data_dir=str(tmp_path), verify=False, num_workers=0)
    with pytest.raises(UserError, match="refused global (posix|nt|os).system") as err:
        dm.setup()
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()


def test_cifar_reader_builds_numpy_and_plain_containers_only(tmp_path):
    from axes_pipeline.data.cifar import read_cifar_pickle

    arr = np.arange(6, dtype=np.uint8).reshape(2, 3)
    plain = tmp_path / "plain"
    plain.write_bytes(pickle.dumps({"data": arr, "labels": [1, 2], "f": 0.5, "t": (np.int64(3), None)}, protocol=2))
    got = read_cifar_pickle(plain)          # a Python-3 protocol-2 pickle (bytes via _codecs.encode) reads too
    assert np.array_equal(got["data"], arr) and got["labels"] == [1, 2] and got["t"][0] == 3
    other = tmp_path / "other"
    other.write_bytes(pickle.dumps({"data": Path("/etc")}))
    with pytest.raises(UserError, match="refused global pathlib"):
        read_cifar_pickle(other)
    (tmp_path / "short").write_bytes(pickle.dumps({"data": arr})[:-5])
    with pytest.raises(UserError, match="not a plain CIFAR pickle"):
        read_cifar_pickle(tmp_path / "short")


def _offline(monkeypatch):
    """Make torchvision's downloads fail as they do without network."""
    import urllib.error

    import torchvision.datasets.utils as tv_utils

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_url", no_network)


@pytest.mark.parametrize("cls, url", [(Cifar10DataModule, "cifar-10-python.tar.gz"),
                                      (Cifar100DataModule, "cifar-100-python.tar.gz"),
                                      (TinyImageNetDataModule, "tiny-imagenet-200.zip")])
def test_download_is_the_default_and_offline_is_one_line(tmp_path, monkeypatch, cls, url):
    _offline(monkeypatch)
    dm = cls(data_dir=str(tmp_path / "data"), num_workers=0)
    assert dm.download is True
    dm.check()                                    # missing data is fine: it will be downloaded
    with pytest.raises(UserError, match="could not download") as err:
        dm.prepare_data()
    msg = str(err.value)
    assert "\n" not in msg and url in msg and "name resolution" in msg and str(tmp_path / "data") in msg


def test_download_skipped_when_data_present(tmp_path, monkeypatch):
    _offline(monkeypatch)
    write_cifar100(tmp_path)
    dm = Cifar100DataModule(data_dir=str(tmp_path), verify=False, num_workers=0)
    dm.prepare_data()                             # present: no download attempted
    assert dm.split_sizes()["test"] == 20
    write_tiny(tmp_path)                          # a partial copy (3 of 200 classes) keeps its own error
    with pytest.raises(UserError, match="not 200"):
        TinyImageNetDataModule(data_dir=str(tmp_path), num_workers=0).setup()


def test_loader_workers_never_above_the_cores(tmp_path, monkeypatch):
    import os
    import warnings

    from axes_pipeline.data.base import available_cpus, loader_workers

    assert 1 <= available_cpus() <= (os.cpu_count() or 1)
    assert loader_workers(0) == 0 and loader_workers(10**6) == available_cpus()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)   # a one-core machine
    write_cifar10(tmp_path)
    dm = Cifar10DataModule(data_dir=str(tmp_path), verify=False, num_workers=4, eval_batch_size=16)
    assert dm.num_workers == 4                    # the config's number, kept as the upper bound
    loader = dm.test_dataloader()
    assert loader.num_workers == 1 and dm.loader(dm.dataset("val")).num_workers == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # torch warns when workers exceed the cores
        x, _ = next(iter(loader))
    assert x.shape == (16, 3, 32, 32)


# --------------------------------------------------------------------------- Tiny-ImageNet
def test_tinyimagenet_layout_and_val_annotations(tmp_path):
    write_tiny(tmp_path)
    dm = TinyImageNetDataModule(data_dir=str(tmp_path), verify=False, num_workers=0, val_fraction=1 / 3,
                                eval_batch_size=4)
    dm.check()
    assert dm.num_classes == 3 and dm.wnids == sorted(TINY_WNIDS) and dm.image_size == 64
    assert dm.split_sizes() == {"train": 12, "val": 6, "test": 9}
    test = dm.dataset("test")
    # official val (our test): labels from val_annotations.txt, matching the pixels
    lines = (tmp_path / "tiny-imagenet-200/val/val_annotations.txt").read_text().split("\n")
    wnid_of = dict(line.split("\t")[:2] for line in lines if line)
    for i in range(len(test)):
        x, y = test[i]
        fname = Path(test.source.samples[test.indices[i]][0]).name
        assert x.shape == (3, 64, 64)
        assert y == sorted(TINY_WNIDS).index(wnid_of[fname]) == _class_of(x, dm.mean, dm.std)
    for i in range(len(dm.dataset("train", "eval"))):
        x, y = dm.dataset("train", "eval")[i]
        assert y == _class_of(x, dm.mean, dm.std)
    xb, _ = next(iter(dm.train_dataloader()))
    assert xb.shape == (12, 3, 64, 64)
    # on device: decoded once, eval batches equal the DataLoader path's
    dev = TinyImageNetDataModule(data_dir=str(tmp_path), verify=False, num_workers=0, val_fraction=1 / 3,
                                 eval_batch_size=4, on_device=True)
    for (xa, ya), (xd, yd) in zip(dm.test_dataloader(), dev.test_dataloader()):
        assert torch.allclose(xa, xd, atol=1e-6) and torch.equal(ya, yd)
    with pytest.raises(UserError, match="not 200"):
        TinyImageNetDataModule(data_dir=str(tmp_path), verify=True).check()


# --------------------------------------------------------------------------- ImageNet-100
def test_imagenet100_class_list_restriction(tmp_path):
    listed = default_class_list()
    assert len(listed) == 100 == len(set(listed)) and listed[:2] == ["n02869837", "n01749939"]
    # a full-ImageNet layout with 4 classes; the list keeps 2 of them
    wnids = [listed[5], listed[0], "n00000001", "n00000002"]
    write_imagenet(tmp_path, "imagenet", wnids)
    keep = [listed[5], listed[0]]
    (tmp_path / "two.txt").write_text(f"# two classes\n{keep[0]}\n{keep[1]}\n")
    dm = ImageNet100DataModule(data_dir=str(tmp_path), class_list=str(tmp_path / "two.txt"), num_workers=0,
                               image_size=32, val_fraction=0.2, batch_size=4)
    dm.check()
    assert dm.num_classes == 2 and dm.wnids == sorted(keep) and dm.root.name == "imagenet"
    assert dm.split_sizes() == {"train": 8, "val": 2, "test": 4}
    all_colours = {w: COLOURS[i] for i, w in enumerate(sorted(wnids))}
    for split in ("train", "val", "test"):
        ds = dm.dataset(split, "eval")
        for i in range(len(ds)):
            x, y = ds[i]
            path = ds.source.samples[ds.indices[i]][0]
            wnid = Path(path).parent.name
            assert x.shape == (3, 32, 32) and wnid in keep and y == sorted(keep).index(wnid)
            assert COLOURS[_class_of(x, dm.mean, dm.std)] == all_colours[wnid]
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 3, 32, 32) and set(yb.tolist()) <= {0, 1}
    # a list given inline works the same; the shipped list lacks 98 classes here -> UserError
    assert ImageNet100DataModule(data_dir=str(tmp_path), class_list=keep, num_workers=0).num_classes == 2
    with pytest.raises(UserError, match="lacks 98 of the 100"):
        ImageNet100DataModule(data_dir=str(tmp_path)).check()
    # a prepared imagenet100/ folder takes precedence over imagenet/
    write_imagenet(tmp_path, "imagenet100", keep, n_train=3, n_val=1)
    dm2 = ImageNet100DataModule(data_dir=str(tmp_path), class_list=keep, num_workers=0, image_size=32)
    assert dm2.root.name == "imagenet100" and dm2.split_sizes()["test"] == 2


# --------------------------------------------------------------------------- missing data
@pytest.mark.parametrize(
    "cls, expected",
    [
        (Cifar10DataModule, "cifar-10-batches-py"),
        (Cifar100DataModule, r"cifar-100-python/\{train,test,meta\}"),
        (TinyImageNetDataModule, "tiny-imagenet-200/ with wnids.txt"),
        (ImageNet100DataModule, r"imagenet100/\{train,val\}/<wnid>"),
    ],
)
def test_missing_data_is_a_user_error_naming_the_layout(tmp_path, cls, expected):
    dm = cls(data_dir=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(UserError, match=expected) as err:
        dm.check()
    assert "\n" not in str(err.value) and str(tmp_path / "nowhere") in str(err.value)
    if cls is not ImageNet100DataModule:
        assert "data.download=true" in str(err.value)
    with pytest.raises(UserError):  # before any loading
        dm.train_dataloader()


def test_imagenet_cannot_download_and_is_not_on_device(tmp_path):
    with pytest.raises(UserError, match="image-net.org"):
        ImageNet100DataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(UserError, match="on_device=false"):
        ImageNet100DataModule(data_dir=str(tmp_path), on_device=True)


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", sorted(DATAMODULES))
def test_config_files_build_their_module(tmp_path, name):
    cfg = make_cfg("train", [f"data={name}", f"paths.data_dir={tmp_path}"], tmp_path)
    dm = build_datamodule(cfg.data)
    assert type(dm) is DATAMODULES[name] and dm.name == name and not dm.on_device
    assert dm.recipe["epochs"] > 0 and isinstance(dm.recipe, dict)
    if name != "digits":   # CIFAR and Tiny-ImageNet download when missing; ImageNet cannot
        assert dm.data_dir == tmp_path and dm.download is (name != "imagenet100") and dm.verify is True


def test_build_datamodule_errors():
    with pytest.raises(UserError, match="unknown data module"):
        build_datamodule(OmegaConf.create({"_target_": "axes_pipeline.data.NoSuchDataModule"}))
    with pytest.raises(UserError, match="_target_"):
        build_datamodule(OmegaConf.create({"name": "digits"}))
    with pytest.raises(UserError, match="unknown data knob.*no_such_knob.*test_fraction"):
        build_datamodule(OmegaConf.create({"_target_": "axes_pipeline.data.DigitsDataModule", "no_such_knob": 1}))
    with pytest.raises(UserError, match="batch_size"):
        build_datamodule(OmegaConf.create({"_target_": "axes_pipeline.data.DigitsDataModule", "batch_size": 0}))


# --------------------------------------------------------------------------- DeviceBatchLoader
def _images(n=6, c=3, h=5, w=7, seed=0):
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_device_loader_shapes_and_normalisation():
    images, labels = _images(n=10), torch.arange(10)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    loader = DeviceBatchLoader(images, labels, 4, mean=mean, std=std, device="cpu")
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    x = torch.cat([b[0] for b in batches])
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and torch.allclose(x, expected, atol=1e-6)
    assert torch.equal(torch.cat([b[1] for b in batches]), labels)
    assert len(DeviceBatchLoader(images, labels, 4, drop_last=True)) == 2
    sub = DeviceBatchLoader(images, labels, 8, indices=[7, 2, 5], device="cpu")
    assert torch.equal(next(iter(sub))[1], torch.tensor([7, 2, 5]))


def test_device_loader_crop_flip_per_image_and_seeded():
    n, p = 64, 2
    base = _images(n=1, h=6, w=6)
    images, labels = base.expand(n, -1, -1, -1).contiguous(), torch.zeros(n, dtype=torch.long)
    kw = dict(crop_padding=p, hflip=True, shuffle=True, seed=123, device="cpu")
    loader = DeviceBatchLoader(images, labels, n, **kw)
    (x0, _), = list(loader)  # epoch 0
    (x1, _), = list(loader)  # epoch 1
    (again, _), = list(DeviceBatchLoader(images, labels, n, **kw))
    assert torch.equal(x0, again)  # same seed, same epoch -> same batch
    assert not torch.equal(x0, x1)  # a new epoch draws anew
    loader.set_epoch(1)
    assert torch.equal(next(iter(loader))[0], x1)  # set_epoch (what Lightning calls) replays an epoch
    # every output is a window of the zero-padded image, possibly flipped; windows differ per image
    padded = torch.nn.functional.pad(base[0], (p, p, p, p)).float() / 255
    raw = x0.float()  # mean 0, std 1: raw = pixels / 255
    seen = set()
    for img in raw:
        match = [
            (oy, ox, f)
            for oy in range(2 * p + 1)
            for ox in range(2 * p + 1)
            for f in (False, True)
            if torch.allclose(img, (lambda w: w.flip(-1) if f else w)(padded[:, oy : oy + 6, ox : ox + 6]), atol=1e-6)
        ]
        assert match, "output is not a crop of the padded image"
        seen.add(match[0])
    assert len(seen) > 10 and {f for _, _, f in seen} == {False, True}


def test_device_loader_in_lightning_fit():
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = DigitsDataModule(on_device=True, augment=True)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(), datamodule=dm)
    assert trainer.fit_loop.epoch_progress.current.completed == 2
    assert isinstance(trainer.train_dataloader, DeviceBatchLoader) and trainer.train_dataloader.epoch == 2
