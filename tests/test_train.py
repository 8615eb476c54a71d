"""Foundation: configs compose, digits trains, resume, epoch-0 checkpoint, bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from axes_pipeline.errors import UserError
from axes_pipeline.runs import read_json
from axes_pipeline.tasks import run_task
from axes_pipeline.training.checkpoints import epoch_checkpoints, load_into, read_checkpoint
from axes_pipeline.training.train import instantiate_model, run_training

from .helpers import CONF, TINY, make_cfg, run_entry

EXPERIMENTS = sorted(p.stem for p in Path(CONF, "experiment").glob("*.yaml"))
# Entry-point configs only: common.yaml is a shared piece, not a stage.
STAGES = sorted(p.stem for p in Path(CONF).glob("*.yaml") if p.stem != "common")


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
    assert cfg.paths.run_dir.endswith(f"{data}-{model}-w1.0/seed42")


@pytest.mark.parametrize("group,choice", [("trainer", "gpu"), ("trainer", "ddp"), ("logger", "csv"),
                                          ("logger", "none"), ("debug", "fast")])
def test_other_groups_compose(group, choice, tmp_path):
    cfg = make_cfg("train", [f"{group}={choice}"], tmp_path)
    expected = {("trainer", "gpu"): lambda c: (c.trainer.accelerator, c.trainer.precision) == ("gpu", "bf16-mixed"),
                ("trainer", "ddp"): lambda c: c.trainer.strategy == "ddp" and c.trainer.devices == -1,
                ("logger", "csv"): lambda c: c.logger is not None and "csv" in c.logger._target_.lower(),
                ("logger", "none"): lambda c: c.logger is None,
                ("debug", "fast"): lambda c: c.trainer.max_epochs == 1 and c.trainer.limit_train_batches == 2}
    assert expected[group, choice](cfg), OmegaConf.to_yaml(cfg[group if group != "debug" else "trainer"])


@pytest.mark.parametrize("overrides", [["trainer.max_epochs=abc"], ["trainer.nosuch=1"], ["optim.lr=abc"],
                                       ["optim.nosuch=1"], ["checkpoint.every_epoch=maybe"], ["checkpoint.nosuch=1"],
                                       ["callbacks.nosuch=1"], ["callbacks.progress_bar.nosuch=1"],
                                       ["callbacks.model_checkpoint.save_top_k=abc"]])
def test_training_schemas_refuse_wrong_types_and_unknown_keys(overrides, tmp_path):
    from hydra.errors import HydraException

    with pytest.raises(HydraException):
        make_cfg("train", overrides, tmp_path)


def test_optimizer_is_the_recipes_torch_class(tmp_path):
    from axes_pipeline.training.optim import optimizer_factory

    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = make_cfg("train", ["model=vgg16"], tmp_path)
    assert sgd.optim._target_ == "torch.optim.SGD"
    opt = optimizer_factory(sgd.optim)(params)
    assert type(opt) is torch.optim.SGD
    assert {k: opt.defaults[k] for k in ("lr", "momentum", "weight_decay", "nesterov")} == \
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False}
    adam = make_cfg("train", ["model=vgg16", "data=tinyimagenet"], tmp_path)   # the dataset's recipe wins
    opt = optimizer_factory(adam.optim)(params)
    assert type(opt) is torch.optim.Adam and (opt.defaults["lr"], opt.defaults["weight_decay"]) == (1e-3, 1e-4)
    assert type(optimizer_factory(make_cfg("train", ["optim.name=adamw"], tmp_path).optim)(params)) is torch.optim.AdamW
    with pytest.raises(Exception, match="choose one of: adam, adamw, sgd"):
        optimizer_factory(make_cfg("train", ["optim.name=rmsprop"], tmp_path).optim)


def test_callbacks_are_target_nodes_switched_off_by_false(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from axes_pipeline.training.callbacks import EpochLines
    from axes_pipeline.training.checkpoints import EpochCheckpoint
    from axes_pipeline.wiring import instantiate_all

    def built(*overrides):
        return [type(c) for c in instantiate_all(make_cfg("train", list(overrides), tmp_path).callbacks, "callbacks")]

    # stdout is no terminal under pytest: no bar, one line per epoch instead
    assert built() == [ModelCheckpoint, EpochLines, LearningRateMonitor]
    assert built("checkpoint.every_epoch=true", "callbacks.lr_monitor=false") == [ModelCheckpoint, EpochCheckpoint,
                                                                                 EpochLines]
    assert built("callbacks.progress_bar=false", "callbacks.epoch_lines=null") == [ModelCheckpoint, LearningRateMonitor]
    best = instantiate_all(make_cfg("train", ["checkpoint.monitor=val/loss", "checkpoint.mode=min"], tmp_path)
                           .callbacks, "callbacks")[0]
    assert (best.monitor, best.mode, best.filename) == ("val/loss", "min", "best")
    with pytest.raises(UserError, match="callbacks.epoch_lines must be a `_target_` node"):
        built("callbacks.epoch_lines=yes")


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from lightning.pytorch.callbacks import TQDMProgressBar

    from axes_pipeline.training.callbacks import progress_bar

    assert progress_bar() is None                       # pytest captures stdout: no terminal
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert isinstance(progress_bar(), TQDMProgressBar)


def test_train_entry_returns_best_val_acc(tiny_run):
    """The objective a sweeper reads: train.py's main returns the best checkpoint's val/acc."""
    import importlib.util

    from .helpers import ROOT

    spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    root, overrides = tiny_run
    cfg = make_cfg("train", overrides, root)
    value = entry.main.__wrapped__(cfg)     # the task under hydra.main (already trained: read back)
    assert isinstance(value, float)
    assert value == read_json(Path(cfg.paths.run_dir) / "train_summary.json")["val_acc"]


def test_paper_recipe_from_plain_overrides(tmp_path):
    # `python train.py model=vgg16 data=cifar100` is the paper's setup without an experiment overlay.
    cfg = make_cfg("train", ["model=vgg16", "data=cifar100"], tmp_path)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("sgd", 0.05, 5e-4)
    assert cfg.trainer.max_epochs == 100 and cfg.data.batch_size == 128
    assert (cfg.model.head, cfg.model.pretrained, cfg.name) == ("imagenet", True, "cifar100_vgg16")
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


# conf/setup/<data>_<model>.yaml -> the overlay that names the same setup (METHODS §10: the bare pair
# composes what the experiment does)
SETUPS = sorted(p.stem for p in Path(CONF, "setup").glob("*.yaml"))
PAIR_EXPERIMENT = {**{f"cifar100_{m}": [f"experiment=cifar100_{m}"] for m in ("resnet18", "vgg16", "mobilenetv2")},
                   **{f"cifar10_{m}": ["experiment=stress_cifar10", f"model={m}"] for m in ("resnet18", "vgg16", "mobilenetv2")},
                   "imagenet100_convnext_t": ["experiment=imagenet100_convnext_t"]}
RECIPE_KEYS = ("max_epochs",)   # the rest of conf/trainer is the device, not the recipe


def _setup_of(cfg) -> dict:
    """What the pair decides: model, data, optimiser, the trainer's recipe keys, train.*, the run name."""
    return {"name": cfg.name, **{k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "data", "optim", "train")},
            "trainer": {k: cfg.trainer.get(k) for k in RECIPE_KEYS}}


def test_every_setup_has_its_experiment():
    assert SETUPS == sorted(PAIR_EXPERIMENT)
    assert set(PAPER_RECIPES) <= set(SETUPS)      # every headline pair of METHODS §10


@pytest.mark.parametrize("stage", ["train", "analyze", "prune"])
@pytest.mark.parametrize("setup", SETUPS)
def test_bare_pair_composes_its_experiment(setup, stage, tmp_path):
    # compose only: pretrained=true would download weights when built, and tests never touch the network
    data, model = setup.split("_", 1)
    bare = make_cfg(stage, [f"data={data}", f"model={model}"], tmp_path)
    overlay = make_cfg(stage, PAIR_EXPERIMENT[setup], tmp_path)
    assert _setup_of(bare) == _setup_of(overlay)
    assert bare.paths.run_dir == overlay.paths.run_dir          # later stages find the run either way
    if data.startswith("cifar"):                                 # the authors' ImageNet initialisation
        assert bare.model.pretrained is True
    if setup in PAPER_RECIPES:
        _, _, knobs, pretrained, opt, lr, _, batch, epochs = PAPER_RECIPES[setup]
        assert {k: bare.model[k] for k in knobs} == knobs and bare.model.pretrained is pretrained
        assert (bare.optim.name, bare.optim.lr, bare.data.batch_size, bare.trainer.max_epochs) == (opt, lr, batch, epochs)


@pytest.mark.parametrize("model", ["resnet18", "vgg16", "mobilenetv2", "convnext_t", "torchvision"])
def test_digits_never_downloads_weights(model, tmp_path):
    # the offline default: no pair setup, random init, the small CIFAR head and strides
    cfg = make_cfg("train", [f"model={model}"], tmp_path)
    assert cfg.data.name == "digits" and cfg.model.pretrained is False and cfg.model.weights is None
    assert cfg.name == "default" and cfg.model.get("head", "cifar") == "cifar" and cfg.model.get("cifar_strides", True)


def test_paper_setup_knobs_stay_knobs(tmp_path):
    cfg = make_cfg("train", ["model=vgg16", "data=cifar100", "model.head=cifar", "model.pretrained=false"], tmp_path)
    assert (cfg.model.head, cfg.model.pretrained, cfg.name) == ("cifar", False, "cifar100_vgg16")
    cfg = make_cfg("train", ["experiment=cifar100_mobilenetv2", "model.cifar_strides=true"], tmp_path)
    assert cfg.model.cifar_strides is True and cfg.model.pretrained is True
    cfg = make_cfg("train", ["model=vgg16", "data=cifar100", "~setup"], tmp_path)      # the backbone's own knobs
    assert (cfg.model.head, cfg.model.pretrained, cfg.name) == ("cifar", False, "default")
    cfg = make_cfg("train", ["experiment=dynamics", "model=vgg16", "data=cifar100"], tmp_path)
    assert (cfg.model.head, cfg.model.pretrained, cfg.name) == ("imagenet", False, "dynamics")   # H2: random init


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
                                               "model.width=0.125"], tmp_path).model, 100)
    linears = [m for m in vgg.classifier if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [4096, 4096, 100] and linears[0].in_features == 64 * 7 * 7
    mnv2 = instantiate_model(make_cfg("train", ["experiment=cifar100_mobilenetv2", "model.pretrained=false",
                                                "model.width=0.25"], tmp_path).model, 100)
    assert mnv2.features[0][0].stride == (2, 2) and mnv2.features[2].conv[1][0].stride == (2, 2)
    with torch.no_grad():
        assert vgg.eval()(x).shape == mnv2.eval()(x).shape == (2, 100)


def test_dynamics_experiment_refuses_pretrained(tmp_path):
    cfg = make_cfg("train", ["experiment=dynamics", "model.width=0.125"], tmp_path)
    assert cfg.model.pretrained is False and cfg.model.from_scratch is True and cfg.checkpoint.every_epoch
    instantiate_model(cfg.model, 10)                                      # random init builds
    for bad in ("model.pretrained=true", "model.weights=/some/resnet18.pth"):
        with pytest.raises(UserError, match="experiment=dynamics trains from random initialisation"):
            instantiate_model(make_cfg("train", ["experiment=dynamics", "model.width=0.125", bad], tmp_path).model, 10)


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


def test_finished_run_with_other_settings_is_refused(tiny_run, tmp_path):
    # optim.lr=0.5 on a finished run used to print "already complete" and keep the old model.
    root, overrides = tiny_run
    for change, needle in (("optim.lr=0.5", "optim.lr: 0.1 -> 0.5"),
                           ("trainer.max_epochs=4", "trainer.max_epochs: 3 -> 4"),
                           ("data.split_seed=7", "data.split_seed: 0 -> 7")):
        with pytest.raises(UserError, match="other settings") as err:
            run_training(make_cfg("train", [*overrides, change], root))
        assert needle in str(err.value) and "name=" in str(err.value)
    # its own name is its own run directory, which analyze/prune find from the same overrides
    cfg = make_cfg("train", [*overrides, "optim.lr=0.5", "name=lr0.5"], root)
    assert "/lr0.5/" in cfg.paths.run_dir
    cfg = make_cfg("train", [*overrides, "optim.lr=0.05", "name=lr${optim.lr}"], root)   # as the README's sweep
    assert "/lr0.05/" in cfg.paths.run_dir


def test_lr_sweep_does_not_collapse_into_one_folder(tmp_path):
    over = [o for o in TINY if not o.startswith("trainer.max_epochs")]
    res = run_entry("train.py", "-m", "optim.lr=0.1,0.05", *over, "trainer.max_epochs=1",
                    "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
                    "+trainer.limit_test_batches=1", cwd=tmp_path)
    assert res.returncode != 0 and "1 train job(s) failed" in res.stderr, res.stderr[-2000:]
    assert "optim.lr: 0.1 -> 0.05" in (res.stderr + res.stdout)
    assert len(list(tmp_path.rglob("train_summary.json"))) == 1      # the first job's run, untouched


def test_train_ckpt_initialises_the_weights(tiny_run, tmp_path):
    from axes_pipeline.training.checkpoints import model_state

    root, overrides = tiny_run
    src = Path(make_cfg("train", overrides, root).paths.run_dir) / "checkpoints" / "epoch_002.ckpt"
    over = [o for o in overrides if not o.startswith(("trainer.max_epochs", "checkpoint."))]
    cfg = make_cfg("train", [*over, "trainer.max_epochs=1", "+trainer.limit_train_batches=1",
                             f"ckpt={src}", "checkpoint.every_epoch=true"], tmp_path)
    run_task(run_training, cfg)
    first = model_state(read_checkpoint(Path(cfg.paths.run_dir) / "checkpoints" / "epoch_000.ckpt"))
    want = model_state(read_checkpoint(src))
    assert all(torch.equal(first[k], want[k]) for k in want)         # epoch 0 = the given weights
    assert read_json(Path(cfg.paths.run_dir) / "train_settings.json")["init_ckpt_digest"]


def test_epoch0_checkpoint_equals_initial_weights(tmp_path):
    import lightning as L

    from axes_pipeline.data import build_datamodule
    from axes_pipeline.training.checkpoints import EpochCheckpoint, model_state
    from axes_pipeline.training.module import ClassifierModule
    from axes_pipeline.training.optim import optimizer_factory

    cfg = make_cfg("train", [*TINY, "trainer.max_epochs=1", "+trainer.limit_train_batches=2"], tmp_path)
    dm = build_datamodule(cfg.data)
    module = ClassifierModule(instantiate_model(cfg.model, dm.num_classes), optimizer_factory(cfg.optim), dm.num_classes)
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
    other = instantiate_model(make_cfg("train", ["model=vgg16", "model.width=0.125"], tmp_path).model, 10)
    with pytest.raises(UserError, match="model=resnet18"):
        load_into(other, good, expect={"model": "vgg16"})
    wrong_classes = instantiate_model(cfg.model, 7)
    with pytest.raises(UserError, match="does not fit"):
        load_into(wrong_classes, good)


@pytest.mark.parametrize("args,needle", [
    (["model=nosuch"], "nosuch"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0 is out of range: it must be >= 1"),   # the schema's range
    (["data.batch_size=-1"], "data.batch_size=-1 is out of range: it must be >= 1"),
    (["seed=-1"], "seed=-1 is out of range"),
    (["trainer=gpu"], "use trainer=cpu"),
    (["data=cifar100", "data.download=false"], "cifar-100-python"),   # never the network in tests
    (["model.weights=no_such_weights.pth"], "model.weights"),
    (["experiment=dynamics", "model.pretrained=true"], "experiment=dynamics trains from random initialisation"),
    (["seed=abc"], "seed must be an integer"),
    (["data=nosuch"], "choose one of: cifar10, cifar100, digits"),
    (["model=nosuch"], "choose one of: convnext_t, custom, mobilenetv2, resnet18, torchvision, vgg16"),
    (["-m", "seed=1,x"], "seed must be an integer"),
    # typed schemas (TrainerConfig, OptimConfig, CheckpointConfig, CallbacksConfig): at composition,
    # in a sweep too (every swept value is composed before the first job)
    (["optim.lr=abc"], "optim.lr=abc"),
    (["optim.name=rmsprop"], "unknown optimizer (optim.name) 'rmsprop'; choose one of: adam, adamw, sgd"),
    (["trainer.nosuch=1"], "trainer.nosuch"),
    (["checkpoint.every_epoch=maybe"], "checkpoint.every_epoch=maybe"),
    (["callbacks.nosuch=1"], "callbacks.nosuch"),
    (["callbacks.model_checkpoint=false"], "callbacks.model_checkpoint cannot be left out"),
    (["-m", "seed=1,2", "optim.lr=0.1,abc"], "optim.lr=abc"),
    (["--multirun", "trainer.max_epochs=1,x"], "trainer.max_epochs=x"),
    (["ckpt=garbage.ckpt"], "does not exist"),
    (["name=../../escape"], "not a plain folder name"),
    (["name=a/b"], "not a plain folder name"),
])
def test_bad_input_one_line(args, needle, tmp_path):
    if args == ["trainer=gpu"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = run_entry("train.py", *args, "logger=none", f"paths.data_dir={tmp_path}/data", cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert needle in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not list(tmp_path.rglob("train_summary.json"))
    refused_by_composition = ("optim.lr=abc", "trainer.nosuch=1", "checkpoint.every_epoch=maybe", "callbacks.nosuch=1",
                              "trainer.max_epochs=0", "data.batch_size=-1", "seed=-1")
    if args[0] in ("seed=abc", "data=nosuch", "model=nosuch", *refused_by_composition) or \
            args[0].startswith(("name=", "-")):
        assert res.stderr.strip().count("\n") == 0, res.stderr     # one line, and nothing written
        assert not [p for p in tmp_path.rglob("*") if p.name != "data"], list(tmp_path.rglob("*"))


def test_garbage_ckpt_in_train_is_one_line(tmp_path):
    bad = tmp_path / "garbage.ckpt"
    bad.write_bytes(b"not a checkpoint")
    res = run_entry("train.py", "logger=none", f"ckpt={bad}", "trainer.max_epochs=1", cwd=tmp_path)
    assert res.returncode == 2 and "corrupt" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not list(tmp_path.rglob("train_summary.json"))


def test_name_never_leaves_the_output_root(tmp_path):
    from axes_pipeline.config import check_name

    root = tmp_path / "out"
    root.mkdir()
    for bad in ("../../escape", "..", "a/b", "/abs", "a\\b", ""):
        with pytest.raises(UserError):
            check_name(bad)
    res = run_entry("report.py", "name=../escape", cwd=root)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not list(root.iterdir())


def _interrupted(monkeypatch, epoch: int, batch: int):
    """Make training die inside epoch ``epoch`` (0-based), as a crash or a kill would."""
    from axes_pipeline.training.train import Throughput

    def crash(self, trainer, pl_module, b, batch_idx):
        if trainer.current_epoch == epoch and batch_idx == batch:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(Throughput, "on_train_batch_start", crash)


def test_resume_is_the_run_it_resumes(tmp_path, monkeypatch):
    import pandas as pd

    from axes_pipeline.training.checkpoints import model_state

    over = [o for o in TINY if not o.startswith(("logger=", "trainer.max_epochs"))] + [
        "logger=csv", "trainer.max_epochs=3"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_task(run_training, make_cfg("train", over, whole))
    with monkeypatch.context() as m:
        _interrupted(m, epoch=2, batch=3)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_task(run_training, make_cfg("train", over, broken))
    cfg = make_cfg("train", over, broken)
    run = Path(cfg.paths.run_dir)
    assert not (run / "train_summary.json").exists()
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == 1     # epochs 0-1 kept
    torch.manual_seed(1234)          # whatever state the new process starts in
    run_task(run_training, cfg)
    ref = Path(make_cfg("train", over, whole).paths.run_dir)
    a = model_state(read_checkpoint(ref / "checkpoints" / "last.ckpt"))
    b = model_state(read_checkpoint(run / "checkpoints" / "last.ckpt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(ref / "train_summary.json")["test_acc"] == read_json(run / "train_summary.json")["test_acc"]
    ma = pd.read_csv(ref / "logs" / "train" / "metrics.csv")
    mb = pd.read_csv(run / "logs" / "train" / "metrics.csv")
    assert {0, 1, 2} <= set(mb.epoch.dropna())                      # the history before the crash is kept
    pd.testing.assert_frame_equal(ma, mb)                           # ... and nothing of the lost epoch twice


def test_damaged_last_ckpt_is_one_line(tmp_path):
    over = [o for o in TINY if not o.startswith("trainer.max_epochs")] + ["trainer.max_epochs=1"]
    cfg = make_cfg("train", over, tmp_path)
    last = Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match=r"cannot resume: .*last.ckpt is damaged .*delete"):
        run_training(cfg)


def test_resume_after_kill_9_is_the_uninterrupted_run(tmp_path):
    """The issue's own case: a `kill -9` during a later epoch, then the same command again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import pandas as pd

    from axes_pipeline.training.checkpoints import model_state

    from .helpers import ROOT

    args = [o for o in TINY if not o.startswith(("logger=", "trainer.max_epochs"))] + [
        "logger=csv", "trainer.max_epochs=4"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for root in (whole, killed):
        root.mkdir()
    assert run_entry("train.py", *args, cwd=whole).returncode == 0
    env = dict(os.environ, AXES_OUTPUT_ROOT=str(killed))
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=killed, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = Path(make_cfg("train", args, killed).paths.run_dir)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "epoch_002.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)                                     # into epoch 2 (0-based) of 4
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "train_summary.json").exists(), "training finished before the kill"
    res = run_entry("train.py", *args, cwd=killed)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = Path(make_cfg("train", args, whole).paths.run_dir)
    a = model_state(read_checkpoint(ref / "checkpoints" / "last.ckpt"))
    b = model_state(read_checkpoint(run / "checkpoints" / "last.ckpt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(pd.read_csv(ref / "logs" / "train" / "metrics.csv"),
                                  pd.read_csv(run / "logs" / "train" / "metrics.csv"))


def test_last_ckpt_without_training_state_is_one_line(tiny_run, tmp_path):
    # a weights-only file in place of last.ckpt loads, but cannot be resumed from
    root, overrides = tiny_run
    src = read_checkpoint(Path(make_cfg("train", overrides, root).paths.run_dir) / "checkpoints" / "best.ckpt")
    over = [o for o in TINY if not o.startswith("trainer.max_epochs")] + ["trainer.max_epochs=1"]
    cfg = make_cfg("train", over, tmp_path)
    last = Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"state_dict": src["state_dict"]}, last)
    with pytest.raises(UserError, match=r"damaged \(no optimizer_states, loops, epoch, global_step"):
        run_training(cfg)
