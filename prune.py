"""FLOPs-matched pruning of a trained run: `python prune.py [same overrides as train.py] [pruning.*=...]`."""

import hydra
from omegaconf import DictConfig

import axes_pipeline.config  # noqa: F401  (registers the config resolvers)
from axes_pipeline.tasks import run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="prune")
def main(cfg: DictConfig):
    from axes_pipeline.pruning.run import run_prune

    return run_task(run_prune, cfg)


if __name__ == "__main__":
    main()
