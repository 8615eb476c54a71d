"""How the two axes align within a layer (METHODS §4): Spearman across channels."""

from __future__ import annotations

import numpy as np

from axes_pipeline.stats import spearman

# (column name in layers.csv, local-axis key, target-axis key)
ALIGNMENTS = (
    ("align_input_capture_task_info", "input_capture", "task_info"),        # primary
    ("align_peer_overlap_target_excess", "peer_overlap", "target_excess"),
    ("align_hull_score_task_unique", "hull_score", "task_unique"),
)


def layer_alignment(axes: dict) -> dict:
    """{column: ρ} for one layer; ``axes`` maps metric key -> ``[C]`` array. Dead channels excluded."""
    alive = ~np.asarray(axes.get("dead", np.zeros(len(axes["input_capture"]), bool)), bool)
    return {col: spearman(np.asarray(axes[a])[alive], np.asarray(axes[b])[alive])[0] for col, a, b in ALIGNMENTS}
