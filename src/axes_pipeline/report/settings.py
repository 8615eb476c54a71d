"""The typed ``report`` block of report.py (the one source of its defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from axes_pipeline.bounds import count, seed_field


@dataclass
class ReportConfig:
    """One report over every run below the sweep directory (default: multirun/<name>, else runs/<name>)."""

    sweep: str | None = None
    runs: list[str] | None = None   # explicit run directories instead of a sweep
    out: str | None = None          # default: <sweep>/report
    accuracy: str = "acc_before_ft"    # acc_before_ft | acc_after_ft
    min_seeds: int = count(3)                 # below this the paired test is "not possible"
    n_boot: int = count(10000)
    test: str = "wilcoxon"             # wilcoxon | permutation
    ci: str = "t"                      # t (Student t, holds 95% at 3-10 seeds) | bca | percentile (bootstrap, ~85% at 5 seeds)
    seed: int = seed_field(0)
