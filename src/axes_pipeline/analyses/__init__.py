"""Analyses of analyze.py: the axes (the table itself is :mod:`axes_pipeline.axes`), lesions, propagation,
dynamics, the linear study; each registers itself in :data:`.registry.ANALYSES`."""
