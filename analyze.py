"""Analyse a trained run: `python analyze.py [same overrides as train.py] [analysis=...]`."""

from omegaconf import DictConfig

from axes_pipeline.config import trained_run_dir  # (importing it registers the config resolvers)
from axes_pipeline.tasks import hydra_entry, run_task


@hydra_entry(config_name="analyze")
def main(cfg: DictConfig) -> float | None:
    """Returns the headline of the axes, the mean over layers of ρ(I_X, I_T) (None when the analyses
    chosen need no axes, or for a job that failed inside a sweep): what a sweeper over the capture
    or metric knobs would track."""
    from axes_pipeline.analyses.analyze import run_analysis

    def one_process(cfg):   # refused under torchrun / DDP launchers: one process, one device
        from axes_pipeline.capture import refuse_several_processes

        refuse_several_processes("analyze.py")
        return run_analysis(cfg).get("axes", {}).get("mean_align_input_capture_task_info")

    return run_task(one_process, cfg, where=trained_run_dir)   # a -m run found by a single run, etc.


if __name__ == "__main__":
    main()
