"""The cross-run report: `python report.py [experiment=...] [report.sweep=DIR]`."""

# isort: off
import interpreter  # noqa: F401  (first: the wrong interpreter is one line, not a traceback)
# isort: on

from omegaconf import DictConfig

import axes_pipeline.config  # noqa: F401  (registers the config resolvers)
from axes_pipeline.tasks import hydra_entry, run_task


@hydra_entry(config_name="report")
def main(cfg: DictConfig):
    from axes_pipeline.report.build import report_dir, report_inputs, run_report

    return run_task(run_report, cfg, where=lambda cfg: report_dir(report_inputs(cfg)))


if __name__ == "__main__":
    main()
