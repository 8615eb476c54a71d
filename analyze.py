"""Analyse a trained run: `python analyze.py [same overrides as train.py] [analysis=...]`."""

from omegaconf import DictConfig

from axes_pipeline.config import trained_run_dir  # (importing it registers the config resolvers)
from axes_pipeline.tasks import hydra_entry, run_task


@hydra_entry(config_name="analyze")
def main(cfg: DictConfig):
    from axes_pipeline.analyses.analyze import run_analysis

    return run_task(run_analysis, cfg, where=trained_run_dir)   # a -m run found by a single run, etc.


if __name__ == "__main__":
    main()
