"""The cross-run report: statistics (``stats``), run discovery (``collect``), tables, figures, rendering."""

from axes_pipeline.report.stats import *  # noqa: F401,F403
from axes_pipeline.report.stats import __all__ as _stats_all

__all__ = list(_stats_all)
