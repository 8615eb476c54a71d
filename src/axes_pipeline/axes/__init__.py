"""The per-channel axes table (METHODS §1-§5), below analyses and pruning, which both read it.

- :mod:`.settings`: the capture, metric, graph and gradient knobs (their typed schema);
- :mod:`.alignment`, :mod:`.graphs`: a layer's alignment of the two axes and its R/S groupings;
- :mod:`.table`: ``layer_analysis`` (one layer's rows and summary), the two tables' schemas, the
  capture cache and the one axes step (``axes_step``; ``load_or_compute_axes`` for the stages
  that only read the table).
"""
