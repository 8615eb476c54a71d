"""Train a backbone: `python train.py [data=...] [model=...] [experiment=...] [-m seed=42,123]`."""

import hydra
from omegaconf import DictConfig

import axes_pipeline.config  # noqa: F401  (registers the config resolvers)
from axes_pipeline.tasks import run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig):
    from axes_pipeline.training.train import run_training

    return run_task(run_training, cfg)


if __name__ == "__main__":
    main()
