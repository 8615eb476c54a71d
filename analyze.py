"""Analyse a trained run: `python analyze.py [same overrides as train.py] [analysis=...]`."""

# isort: off
import interpreter  # noqa: F401  (first: the wrong interpreter is one line, not a traceback)
# isort: on

from omegaconf import DictConfig

from axes_pipeline.tasks import hydra_entry, run_task, trained_dir  # (it registers the config resolvers)


@hydra_entry(config_name="analyze")
def main(cfg: DictConfig) -> float | None:
    """Returns the headline of the axes, the mean over layers of ρ(I_X, I_T) (None when the analyses
    chosen need no axes, or for a job that failed inside a sweep): what a sweeper over the capture
    or metric knobs would track."""
    from axes_pipeline.analyses.analyze import run_analysis

    def axes_headline(cfg):
        return run_analysis(cfg).get("axes", {}).get("mean_align_input_capture_task_info")

    # where: a -m run found by a single run, etc.; one process, one device (refused under torchrun / DDP)
    return run_task(axes_headline, cfg, where=trained_dir, one_process=True)


if __name__ == "__main__":
    main()
