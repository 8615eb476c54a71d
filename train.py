"""Train a backbone: `python train.py [data=...] [model=...] [experiment=...] [-m seed=42,123]`."""

# isort: off
import interpreter  # noqa: F401  (first: the wrong interpreter is one line, not a traceback)
# isort: on

from omegaconf import DictConfig

import axes_pipeline.config  # noqa: F401  (registers the config resolvers)
from axes_pipeline.tasks import hydra_entry, run_task


@hydra_entry(config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns the best checkpoint's val/acc, the objective of a sweeper (``hydra/sweeper=optuna``;
    None for a job that failed inside a sweep)."""
    from axes_pipeline.training.train import run_training

    return run_task(lambda cfg: float(run_training(cfg)["val_acc"]), cfg)


if __name__ == "__main__":
    main()
