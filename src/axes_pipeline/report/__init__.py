"""The cross-run report: run discovery (``collect``), tables, figures, rendering (``build``).
Its statistics live in :mod:`axes_pipeline.stats`."""
