"""The typed configs: every option composes, a wrong type or an unknown key fails at composition
(one line, exit status 2 through an entry point), and the dataclass defaults are what the YAML
files used to say."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from axes_pipeline.errors import UserError
from axes_pipeline.tasks import check_composes

from .helpers import CONF, make_cfg, run_entry

STAGES = ("train", "analyze", "prune", "report")
EXPERIMENTS = sorted(p.stem for p in Path(CONF, "experiment").glob("*.yaml"))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in Path(CONF, group).glob("*.yaml"))


@pytest.mark.parametrize("stage", STAGES)
def test_every_option_and_experiment_composes(stage, tmp_path):
    """Each experiment, and each option of the typed groups alone and under experiment=demo (an
    overlay that sets model, checkpoint and capture keys): about 50 compositions per stage."""
    groups = ["data", "model", "paths", *(["debug"] if stage != "report" else []),
              *(["analysis"] if stage == "analyze" else [])]
    runs = [[f"experiment={e}"] for e in EXPERIMENTS]
    for group in groups:
        for option in _options(group):
            extra = ["model.net._target_=x.Net"] if option == "custom" else []
            runs += [[f"{group}={option}", *extra], ["experiment=demo", f"{group}={option}", *extra]]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for over in runs:
            cfg = compose(config_name=stage, overrides=[f"paths.output_root={tmp_path}", *over])
            assert cfg.stage == stage, over
            OmegaConf.to_container(cfg, resolve=True)      # every interpolation resolves


@pytest.mark.parametrize("override", [
    "data.batch_size=abc", "data.recipe.epochs=abc", "model.width=abc", "model.pretrained=maybe",
    "capture.n_cal=abc", "metrics.hull_max=abc", "graphs.edge_fraction=abc", "gradients.enabled=maybe",
    "train.warmup_epochs=abc", "allow_partial=maybe", "analysis.axes.recompute=maybe",
    "data.nosuch=1", "model.nosuch=1", "capture.nosuch=1", "metrics.nosuch=1", "graphs.nosuch=1",
    "gradients.nosuch=1", "train.nosuch=1", "paths.nosuch=1", "analysis.nosuch=1", "analysis.axes.nosuch=1",
    "nosuch=1",
])
def test_wrong_type_or_unknown_key_fails_at_composition(override, tmp_path):
    with pytest.raises(Exception, match="override|Key|convert"):
        make_cfg("analyze", [override], tmp_path)
    with pytest.raises(UserError) as err:
        check_composes(Path(CONF), "analyze", [override])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("analysis,knob", [("lesion", "n_boot"), ("propagation", "null_draws"),
                                           ("dynamics", "k"), ("linear_gaussian", "steps")])
def test_each_analysis_block_is_typed(analysis, knob, tmp_path):
    for bad in (f"analysis.{analysis}.{knob}=abc", f"analysis.{analysis}.nosuch=1"):
        with pytest.raises(UserError):
            check_composes(Path(CONF), "analyze", [f"analysis={analysis}", bad])
    with pytest.raises(UserError):
        check_composes(Path(CONF), "analyze", ["analysis=all", f"analysis.{analysis}.{knob}=abc"])


@pytest.mark.parametrize("stage,args", [
    ("report", ["report.n_boot=abc"]), ("report", ["report.nosuch=1"]),
    ("train", ["data=cifar10", "data.download=maybe"]), ("train", ["data=imagenet100", "data.test_fraction=0.1"]),
    ("train", ["model=vgg16", "model.cifar_stem=false"]), ("train", ["experiment=demo", "capture.n_cal=abc"]),
    ("train", ["debug=fast", "data.nosuch=1"]),
])
def test_other_stages_and_options_are_typed(stage, args):
    with pytest.raises(UserError):
        check_composes(Path(CONF), stage, args)


def test_plus_adds_keys_only_to_open_nodes(tmp_path):
    for added in ("+data.nosuch=1", "+analysis.lesion.nosuch=1", "+capture.nosuch=1", "+nosuch=1"):
        args = ["analysis=lesion", added]
        with pytest.raises(UserError, match="is typed .* takes no new keys"):
            check_composes(Path(CONF), "analyze", args)
    # a user network's own arguments are open; a group's option may still be added
    check_composes(Path(CONF), "train", ["model=custom", "model.net._target_=x.Net", "+model.net.depth=3"])
    check_composes(Path(CONF), "train", ["~experiment", "+experiment=demo"])


def test_a_sweep_checks_each_choice():
    check_composes(Path(CONF), "train", ["-m", "seed=1,2", "data=digits,cifar10", "seed=range(1,3)"])
    for args in (["-m", "seed=1,2", "data.nosuch=1"], ["-m", "data.batch_size=64,abc"]):
        with pytest.raises(UserError):
            check_composes(Path(CONF), "train", args)


def test_entry_point_refuses_a_typed_mistake_in_one_line(tmp_path):
    for args in (["data.batch_size=abc"], ["-m", "seed=1,2", "analysis.lesion.nosuch=1", "analysis=lesion"]):
        res = run_entry("analyze.py", *args, cwd=tmp_path)
        assert res.returncode == 2, res.stderr[-2000:]
        assert res.stderr.strip().startswith("error: ") and res.stderr.strip().count("\n") == 0, res.stderr
    assert not list(tmp_path.iterdir())


def test_defaults_are_the_old_yaml_values(tmp_path):
    cfg = make_cfg("analyze", [], tmp_path)
    assert (cfg.name, cfg.seed, cfg.ckpt, cfg.allow_partial, cfg.device, cfg.plots) == ("default", 42, None, False,
                                                                                        "auto", True)
    assert OmegaConf.to_container(cfg.train) == {"label_smoothing": 0.0, "warmup_epochs": 0, "channels_last": "auto",
                                                 "compile": False}
    assert OmegaConf.to_container(cfg.capture) == {
        "n_cal": 2000, "transform": "eval", "point": "pre_bn", "spatial": "sample", "samples_per_image": 16,
        "target": "logit_margin", "batch_size": 256, "seed": 0, "layers": None, "cache": True}
    assert OmegaConf.to_container(cfg.metrics) == {
        "sigma0": "median", "hull_eps": 0.05, "hull_max": 10, "hull_order": "correlation", "ridge": 1e-3, "pool": 50,
        "top": 10, "peers": "layer", "dtype": "float64"}
    # null_se, check_layers, check_max_dim: issue 22 (the null's standard-error stop, the whitened check's layers)
    assert OmegaConf.to_container(cfg.graphs) == {"edge_fraction": 0.1, "null_shuffles": 20, "null_se": 0.002,
                                                  "max_channels": None}
    assert OmegaConf.to_container(cfg.gradients) == {"enabled": True, "max_patch_dim": 4608, "sigma_rows": 8192,
                                                     "check_layers": 6, "check_max_dim": 2304}
    assert OmegaConf.to_container(cfg.analysis) == {"axes": {"recompute": False}}
    assert cfg.paths.run_dir == str(tmp_path / "runs" / "default" / "digits-resnet18-w1.0" / "seed42")
    assert OmegaConf.to_container(cfg.data) == {
        "_target_": "axes_pipeline.data.DigitsDataModule", "name": "digits", "batch_size": 64, "eval_batch_size": 256,
        "num_workers": 0, "val_fraction": 0.1, "split_seed": 0, "on_device": False, "image_size": 16,
        "augment": False, "crop_padding": 2, "hflip": False, "recipe": {"epochs": 20}, "test_fraction": 0.2}
    assert OmegaConf.to_container(cfg.model) == {
        "_target_": "axes_pipeline.models.build_model", "_partial_": True, "name": "resnet18", "width": 1.0,
        "pretrained": False, "weights": None, "recipe": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4},
        "from_scratch": False, "cifar_stem": True}
    lesion = make_cfg("analyze", ["analysis=all"], tmp_path).analysis
    assert OmegaConf.to_container(lesion.lesion) == {
        "layers": None, "channels": "auto", "seed": 0, "eval_samples": 1000, "replace": ["hull", "all"],
        "min_damage": 1e-4, "n_bins": 5,
        "predictors": ["input_capture", "peer_overlap", "full_explained", "hull_score", "l1", "taylor", "task_info"],
        "base_terms": ["input_capture", "task_info"], "peer_terms": ["full_explained", "hull_score"],
        "r2_scale": "rank", "n_boot": 2000, "taylor_images": 1024, "batch_size": 256, "max_rows": "auto",
        "max_gb": 2.0, "resume": True}
    assert lesion.dynamics.required is False and lesion.dynamics.k == 6 and lesion.propagation.residual == "main"
    assert OmegaConf.to_container(lesion.linear_gaussian) == {"input_dim": 128, "channels": 64, "steps": 1200,
                                                             "lr": 0.01, "eval_every": 100, "seed": None}
    # (issue 28: the study's seed is the run's unless set, so three seeds are three draws)
    report = make_cfg("report", [], tmp_path).report
    assert OmegaConf.to_container(report) == {
        "sweep": None, "runs": None, "out": None, "accuracy": "acc_before_ft", "min_seeds": 3, "n_boot": 10000,
        "test": "wilcoxon", "ci": "t", "seed": 0}


@pytest.mark.parametrize("data,epochs,batch,image,download,optimizer", [
    ("cifar10", 50, 128, 32, True, None), ("cifar100", 100, 128, 32, True, None),
    ("tinyimagenet", 50, 128, 64, True, "adam"), ("imagenet100", 30, 64, 224, False, "adam"),
])
def test_dataset_defaults(data, epochs, batch, image, download, optimizer, tmp_path):
    cfg = make_cfg("train", [f"data={data}"], tmp_path)
    d = cfg.data
    assert (d.recipe.epochs, d.batch_size, d.image_size, d.download) == (epochs, batch, image, download)
    assert d.data_dir == str(tmp_path / "data") and cfg.trainer.max_epochs == epochs
    assert OmegaConf.select(d, "recipe.optimizer") == optimizer
    assert cfg.optim.name == (optimizer or "sgd")     # a dataset's recipe overrides the backbone's
    if data == "imagenet100":
        assert (d.eval_batch_size, d.num_workers, d.crop_padding, d.class_list) == (128, 8, 0, None)


@pytest.mark.parametrize("model,lr,extra", [
    ("vgg16", 0.05, {"head": "cifar", "dropout": 0.5}), ("mobilenetv2", 0.01, {"cifar_strides": True, "dropout": 0.2}),
    ("convnext_t", 1e-3, {"stochastic_depth_prob": 0.1, "layer_scale": 1e-6}),
    ("torchvision", 0.05, {"arch": "resnet50"}),
])
def test_model_defaults(model, lr, extra, tmp_path):
    m = make_cfg("train", [f"model={model}"], tmp_path).model
    assert m.recipe.lr == lr and {k: m[k] for k in extra} == extra
    assert m.name == ("tv_resnet50" if model == "torchvision" else model)


def test_a_datamodule_built_in_python_takes_the_schema_defaults():
    from axes_pipeline.data import DATAMODULES

    for name, cls in DATAMODULES.items():
        dm = cls(data_dir="/nonexistent") if name != "digits" else cls()
        s = cls.settings()
        assert (dm.name, dm.batch_size, dm.image_size, dm.crop_padding, dm.hflip) == (
            s.name, s.batch_size, s.image_size, s.crop_padding, s.hflip)
        assert dm.recipe["epochs"] == s.recipe.epochs
