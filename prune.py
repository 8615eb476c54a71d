"""FLOPs-matched pruning of a trained run: `python prune.py [same overrides as train.py] [pruning.*=...]`."""

# isort: off
import interpreter  # noqa: F401  (first: the wrong interpreter is one line, not a traceback)
# isort: on

from omegaconf import DictConfig

from axes_pipeline.tasks import hydra_entry, run_task, trained_dir  # (it registers the config resolvers)


@hydra_entry(config_name="prune")
def main(cfg: DictConfig) -> float | None:
    """Returns the validation FLOPs-AUC (mean over its draws) of the first score in
    ``pruning.scores``: the objective of a sweeper over pruning knobs. Validation, never test, since
    a sweeper selects on it; None without a validation split or for a job that failed in a sweep."""
    from axes_pipeline.pruning.run import run_prune

    def first_val_auc(cfg):
        scores = run_prune(cfg)["scores"]   # in the order of pruning.scores
        return next(iter(scores.values()), {}).get("val_flops_auc")

    # where: a -m run found by a single run, etc.; one process, one device (refused under torchrun / DDP)
    return run_task(first_val_auc, cfg, where=trained_dir, one_process=True)


if __name__ == "__main__":
    main()
