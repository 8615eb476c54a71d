"""Report: statistics, tables, plots, HTML (the last room of the data flow)."""

from axes_pipeline.report.stats import (
    PAPER_REFERENCE,
    binned_spearman,
    compare_paired,
    effect_size_paired,
    flops_auc,
    flops_auc_relative,
    holm,
    incremental_r2,
    mean_sd,
    paired_bootstrap_ci,
    paired_test,
    spearman,
)

__all__ = [
    "PAPER_REFERENCE",
    "binned_spearman",
    "compare_paired",
    "effect_size_paired",
    "flops_auc",
    "flops_auc_relative",
    "holm",
    "incremental_r2",
    "mean_sd",
    "paired_bootstrap_ci",
    "paired_test",
    "spearman",
]
