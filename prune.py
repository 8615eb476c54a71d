"""FLOPs-matched pruning of a trained run: `python prune.py [same overrides as train.py] [pruning.*=...]`."""

from omegaconf import DictConfig

from axes_pipeline.config import trained_run_dir  # (importing it registers the config resolvers)
from axes_pipeline.tasks import hydra_entry, run_task


@hydra_entry(config_name="prune")
def main(cfg: DictConfig) -> float | None:
    """Returns the validation FLOPs-AUC (mean over its draws) of the first score in
    ``pruning.scores``: the objective of a sweeper over pruning knobs. Validation, never test, since
    a sweeper selects on it; None without a validation split or for a job that failed in a sweep."""
    from axes_pipeline.pruning.run import run_prune

    def one_process(cfg):   # refused under torchrun / DDP launchers: one process, one device
        from axes_pipeline.capture import refuse_several_processes

        refuse_several_processes("prune.py")
        scores = run_prune(cfg)["scores"]   # in the order of pruning.scores
        return next(iter(scores.values()), {}).get("val_flops_auc")

    return run_task(one_process, cfg, where=trained_run_dir)   # a -m run found by a single run, etc.


if __name__ == "__main__":
    main()
