"""Reference code that tests and benchmarks import, kept out of the package: slow loop oracles,
harnesses and the raw-samples forms of production functions (``sys.path`` must hold the repository
root: pytest puts it there; a benchmark inserts it)."""
