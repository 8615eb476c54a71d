"""Foundation: configs compose, digits trains, resume, epoch-0 checkpoint, bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from axes_pipeline.errors import UserError
from axes_pipeline.runs import read_json
from axes_pipeline.tasks import run_task
from axes_pipeline.training.checkpoints import epoch_checkpoints, load_into, read_checkpoint
from axes_pipeline.training.train import instantiate_model, run_training

from .conftest import CONF, TINY, make_cfg, run_entry

EXPERIMENTS = sorted(p.stem for p in Path(CONF, "experiment").glob("*.yaml"))
# Entry-point configs only: common.yaml and axes.yaml are shared pieces, not stages.
STAGES = sorted(p.stem for p in Path(CONF).glob("*.yaml") if p.stem not in {"common", "axes"})


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(stage, experiment, tmp_path):
    cfg = make_cfg(stage, [f"experiment={experiment}"], tmp_path)
    assert cfg.name == experiment
    assert str(tmp_path) in cfg.paths.run_dir
    assert cfg.trainer.max_epochs > 0 and cfg.optim.lr > 0


@pytest.mark.parametrize("data", ["digits", "cifar10", "cifar100", "tinyimagenet", "imagenet100"])
@pytest.mark.parametrize("model", ["resnet18", "vgg16", "mobilenetv2", "convnext_t"])
def test_data_model_grid_composes(data, model, tmp_path):
    cfg = make_cfg("train", [f"data={data}", f"model={model}"], tmp_path)
    assert cfg.data.name == data and cfg.model.name == model
    assert cfg.run_dir if False else cfg.paths.run_dir.endswith(f"{data}-{model}-w1.0/seed42")


@pytest.mark.parametrize("group,choice", [("trainer", "gpu"), ("trainer", "ddp"), ("logger", "csv"),
                                          ("logger", "none"), ("debug", "fast")])
def test_other_groups_compose(group, choice, tmp_path):
    make_cfg("train", [f"{group}={choice}"], tmp_path)


def test_paper_recipe_from_plain_overrides(tmp_path):
    # `python train.py model=vgg16 data=cifar100` is the paper's recipe without an experiment overlay.
    cfg = make_cfg("train", ["model=vgg16", "data=cifar100"], tmp_path)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("sgd", 0.05, 5e-4)
    assert cfg.trainer.max_epochs == 100 and cfg.data.batch_size == 128
    cfg = make_cfg("train", ["model=resnet18", "data=tinyimagenet"], tmp_path)
    assert (cfg.optim.name, cfg.optim.lr, cfg.trainer.max_epochs) == ("adam", 1e-3, 50)


# METHODS §10, one row per headline experiment: (data, model, architecture knobs, pretrained,
# optimizer, lr, weight decay, batch, epochs). "As torchvision" = torchvision's classifier/strides.
PAPER_RECIPES = {
    "cifar100_resnet18": ("cifar100", "resnet18", {"cifar_stem": True}, True, "sgd", 0.1, 5e-4, 128, 100),
    "cifar100_vgg16": ("cifar100", "vgg16", {"head": "imagenet"}, True, "sgd", 0.05, 5e-4, 128, 100),
    "cifar100_mobilenetv2": ("cifar100", "mobilenetv2", {"cifar_strides": False}, True, "sgd", 0.01, 5e-4, 128, 100),
    "imagenet100_convnext_t": ("imagenet100", "convnext_t", {}, False, "adam", 1e-3, 1e-4, 64, 30),
}


@pytest.mark.parametrize("experiment", sorted(PAPER_RECIPES))
def test_headline_experiments_carry_the_paper_recipe(experiment, tmp_path):
    data, model, knobs, pretrained, opt, lr, wd, batch, epochs = PAPER_RECIPES[experiment]
    cfg = make_cfg("train", [f"experiment={experiment}"], tmp_path)
    assert (cfg.data.name, cfg.model.name, cfg.model.width) == (data, model, 1.0)
    assert {k: cfg.model[k] for k in knobs} == knobs
    assert cfg.model.pretrained is pretrained and cfg.model.weights is None
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.data.batch_size) == (opt, lr, wd, batch)
    assert cfg.trainer.max_epochs == epochs and cfg.data.download is (data != "imagenet100")
    if opt == "sgd":
        assert cfg.optim.momentum == 0.9 and not cfg.optim.nesterov
    if data == "cifar100":   # random crop 32 / padding 4 + flip, CIFAR-100 statistics
        assert (cfg.data.image_size, cfg.data.crop_padding, cfg.data.augment, cfg.data.hflip) == (32, 4, True, True)
        from axes_pipeline.data import Cifar100DataModule

        assert Cifar100DataModule.mean == (0.5071, 0.4867, 0.4408)
        assert Cifar100DataModule.std == (0.2675, 0.2565, 0.2761)


def test_headline_architectures_are_torchvision_at_32px(tmp_path):
    # the built networks (narrow, no weights): torchvision's VGG classifier and MobileNetV2 strides
    x = torch.randn(2, 3, 32, 32)
    vgg = instantiate_model(make_cfg("train", ["experiment=cifar100_vgg16", "model.pretrained=false",
                                               "model.width=0.125"], tmp_path), 100)
    linears = [m for m in vgg.classifier if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [4096, 4096, 100] and linears[0].in_features == 64 * 7 * 7
    mnv2 = instantiate_model(make_cfg("train", ["experiment=cifar100_mobilenetv2", "model.pretrained=false",
                                                "model.width=0.25"], tmp_path), 100)
    assert mnv2.features[0][0].stride == (2, 2) and mnv2.features[2].conv[1][0].stride == (2, 2)
    with torch.no_grad():
        assert vgg.eval()(x).shape == mnv2.eval()(x).shape == (2, 100)


def test_dynamics_experiment_refuses_pretrained(tmp_path):
    cfg = make_cfg("train", ["experiment=dynamics", "model.width=0.125"], tmp_path)
    assert cfg.model.pretrained is False and cfg.model.from_scratch is True and cfg.checkpoint.every_epoch
    instantiate_model(cfg, 10)                                      # random init builds
    for bad in ("model.pretrained=true", "model.weights=/some/resnet18.pth"):
        with pytest.raises(UserError, match="experiment=dynamics trains from random initialisation"):
            instantiate_model(make_cfg("train", ["experiment=dynamics", "model.width=0.125", bad], tmp_path), 10)


def test_one_epoch_digits_train(tiny_run):
    root, overrides = tiny_run
    cfg = make_cfg("train", overrides, root)
    run = Path(cfg.paths.run_dir)
    summary = read_json(run / "train_summary.json")
    assert summary["epochs"] == 3 and 0.0 <= summary["test_acc"] <= 1.0
    assert summary["val_acc"] > 0.3, summary          # learns something in 3 tiny epochs
    assert summary["train_images_per_s"] > 0
    for name in ("last.ckpt", "best.ckpt", "epoch_000.ckpt", "epoch_003.ckpt"):
        assert (run / "checkpoints" / name).is_file()
    assert list(epoch_checkpoints(run / "checkpoints")) == [0, 1, 2, 3]
    assert summary["config"]["model"]["name"] == "resnet18"


def test_rerun_complete_is_skipped(tiny_run, capsys):
    root, overrides = tiny_run
    cfg = make_cfg("train", overrides, root)
    before = (Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt").stat().st_mtime
    run_training(cfg)
    assert "already complete" in capsys.readouterr().out
    assert (Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt").stat().st_mtime == before


def test_resume_continues_from_saved_epoch(tmp_path):
    over = [o for o in TINY if not o.startswith("trainer.max_epochs")]
    run_task(run_training, make_cfg("train", [*over, "trainer.max_epochs=1"], tmp_path))
    cfg2 = make_cfg("train", [*over, "trainer.max_epochs=2"], tmp_path)
    ckpts = Path(cfg2.paths.run_dir) / "checkpoints"
    first = (ckpts / "epoch_001.ckpt").stat().st_mtime
    run_task(run_training, cfg2)
    assert (ckpts / "epoch_001.ckpt").stat().st_mtime == first      # epoch 1 was not redone
    assert read_checkpoint(ckpts / "last.ckpt")["epoch"] == 1         # Lightning's 0-based last epoch
    assert read_json(Path(cfg2.paths.run_dir) / "train_summary.json")["epochs"] == 2


def test_epoch0_checkpoint_equals_initial_weights(tmp_path):
    import lightning as L

    from axes_pipeline.training.checkpoints import EpochCheckpoint, model_state
    from axes_pipeline.training.module import ClassifierModule
    from axes_pipeline.training.train import build_datamodule

    cfg = make_cfg("train", [*TINY, "trainer.max_epochs=1", "+trainer.limit_train_batches=2"], tmp_path)
    dm = build_datamodule(cfg)
    module = ClassifierModule(instantiate_model(cfg, dm.num_classes), instantiate(cfg.optim), dm.num_classes)
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False,
                        callbacks=[EpochCheckpoint(tmp_path / "ck")])
    trainer.fit(module, datamodule=dm)
    saved = model_state(read_checkpoint(tmp_path / "ck" / "epoch_000.ckpt"))
    after = model_state(read_checkpoint(tmp_path / "ck" / "epoch_001.ckpt"))
    assert all(torch.equal(saved[k], initial[k]) for k in initial)
    assert any(not torch.equal(after[k], initial[k]) for k in initial if initial[k].is_floating_point())


# ---- bad input: one clear line, non-zero exit ----

def test_checkpoint_missing_corrupt_or_other_model(tiny_run, tmp_path):
    root, overrides = tiny_run
    cfg = make_cfg("train", overrides, root)
    good = Path(cfg.paths.run_dir) / "checkpoints" / "best.ckpt"
    with pytest.raises(UserError, match="not found"):
        read_checkpoint(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt"):
        read_checkpoint(bad)
    other = instantiate_model(make_cfg("train", ["model=vgg16", "model.width=0.125"], tmp_path), 10)
    with pytest.raises(UserError, match="model=resnet18"):
        load_into(other, good, expect={"model": "vgg16"})
    wrong_classes = instantiate_model(cfg, 7)
    with pytest.raises(UserError, match="does not fit"):
        load_into(wrong_classes, good)


@pytest.mark.parametrize("args,needle", [
    (["model=nosuch"], "nosuch"),
    (["trainer.max_epochs=0"], "trainer.max_epochs must be positive"),
    (["data.batch_size=-1"], "data.batch_size must be positive"),
    (["trainer=gpu"], "use trainer=cpu"),
    (["data=cifar100", "data.download=false"], "cifar-100-python"),   # never the network in tests
    (["model.weights=no_such_weights.pth"], "model.weights"),
    (["experiment=dynamics", "model.pretrained=true"], "experiment=dynamics trains from random initialisation"),
])
def test_bad_input_one_line(args, needle, tmp_path):
    if args == ["trainer=gpu"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = run_entry("train.py", *args, "logger=none", f"paths.data_dir={tmp_path}/data", cwd=tmp_path)
    assert res.returncode != 0
    assert needle in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not list(tmp_path.rglob("train_summary.json"))
