"""Analyse a trained run: `python analyze.py [same overrides as train.py] [analysis=...]`."""

import hydra
from omegaconf import DictConfig

import axes_pipeline.config  # noqa: F401  (registers the config resolvers)
from axes_pipeline.tasks import run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="analyze")
def main(cfg: DictConfig):
    from axes_pipeline.analyses.analyze import run_analysis

    return run_task(run_analysis, cfg)


if __name__ == "__main__":
    main()
