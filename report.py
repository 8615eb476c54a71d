"""The cross-run report: `python report.py [experiment=...] [report.sweep=DIR]`."""

import hydra
from omegaconf import DictConfig

import axes_pipeline.config  # noqa: F401  (registers the config resolvers)
from axes_pipeline.tasks import run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="report")
def main(cfg: DictConfig):
    from axes_pipeline.report.build import report_dir, run_report

    return run_task(run_report, cfg, where=report_dir)


if __name__ == "__main__":
    main()
