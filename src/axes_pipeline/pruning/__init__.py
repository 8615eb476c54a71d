"""FLOPs-matched structured pruning (METHODS §9).

- :mod:`.scores`: the score registry (``SCORES``, ``resolve_score``; ``Score(ctx, draw) ->
  {layer: [C]}``, each with its axis: local / target / mixed / baseline);
- :mod:`.groups`: coupled channel groups from Torch-Pruning's dependency graph
  (``build_groups``), the masked reference model (``masked``), ``prune_physically``;
- :mod:`.flops`: fvcore MACs (``fvcore_macs``) and the exact analytic count (``CostModel``);
- :mod:`.allocation`: group scores, ``global`` / ``uniform`` / ``hybrid`` allocation,
  ``match_flops`` (FLOPs search) and ``nominal_fraction`` (channel-fraction protocol);
- :mod:`.evaluate`: accuracy, short fine-tune, latency; :mod:`.export`: save / reload a pruned
  network (weights-only); :mod:`.run`: ``run_prune(cfg)``, the body of ``prune.py``.
"""

from axes_pipeline.pruning.allocation import (
    ALLOCATIONS,
    Allocation,
    SearchResult,
    group_scores,
    keep_masks,
    make_allocation,
    match_flops,
    nominal_fraction,
)
from axes_pipeline.pruning.export import load_pruned, save_pruned
from axes_pipeline.pruning.flops import CostModel, count_params, fvcore_macs
from axes_pipeline.pruning.groups import ChannelGroup, GroupSet, build_groups, full_keep, masked, prune_physically
from axes_pipeline.pruning.scores import (
    AXES,
    DEFAULT_SCORES,
    FAMILIES,
    SCORES,
    Score,
    ScoreContext,
    minmax,
    register,
    resolve_score,
    score_names,
)

__all__ = [
    "ALLOCATIONS", "AXES", "Allocation", "ChannelGroup", "CostModel", "DEFAULT_SCORES", "FAMILIES",
    "GroupSet", "SCORES", "Score", "ScoreContext", "SearchResult", "build_groups", "count_params",
    "full_keep", "fvcore_macs", "group_scores", "keep_masks", "load_pruned", "make_allocation", "masked",
    "match_flops", "minmax", "nominal_fraction", "prune_physically", "register", "resolve_score",
    "run_prune", "save_pruned", "score_names",
]


def run_prune(cfg):
    """See :func:`axes_pipeline.pruning.run.run_prune` (imported lazily: it pulls in the stage)."""
    from axes_pipeline.pruning.run import run_prune as _run

    return _run(cfg)
