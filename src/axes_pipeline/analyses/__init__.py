"""Analyses of analyze.py: the axes table, groupings, lesions, propagation, dynamics, the linear study."""
