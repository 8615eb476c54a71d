"""FLOPs-matched structured pruning (METHODS §9).

- :mod:`.settings`: the typed ``cfg.pruning`` schema (``PruningConfig``, every default);
  :mod:`.resolved`: the validated settings of a run (``PruneSettings``);
- :mod:`.scores`: the score registry (``SCORES``, ``resolve_score``; ``Score(ctx, draw) ->
  {layer: [C]}``, each with its axis: local / target / mixed / baseline; ``tp.<ClassName>``: a Torch-Pruning
  importance); :mod:`axes_pipeline.models.taylor`:
  Σ|w·∂L/∂w| (also a lesion predictor of analyze.py); :mod:`.inputs`: the analysis table and
  calibration batches the scores read;
- :mod:`.groups`: coupled channel groups from Torch-Pruning's dependency graph
  (``build_groups``), the masked reference model (``masked``), ``prune_physically``;
- :mod:`.flops`: fvcore MACs (``fvcore_macs``) and the exact analytic count (``CostModel``);
- :mod:`.allocation`: group scores (``pruning.normalize``), the ``global`` / ``uniform`` / ``hybrid`` /
  ``knapsack`` / ``sensitivity`` allocations, ``match_flops`` (FLOPs search) and ``nominal_fraction``
  (channel-fraction protocol); :mod:`.sensitivity`: the one-layer-at-a-time scan (Li et al. 2017);
- :mod:`.evaluate`: accuracy, short fine-tune, latency; :mod:`.export`: save / reload a pruned
  network (weights-only);
- :mod:`.sweep`: every score × target, one point each; :mod:`.points`: a point's key, record,
  resume and the unpruned reference; :mod:`.summary`: curves, summary, FLOPs-AUC; :mod:`.plots`;
  :mod:`.run`: ``run_prune(cfg)``, the body of ``prune.py``.

The names below are imported on first use: ``axes_pipeline.pruning.settings`` is read at every
composition (the schema) and must not pull in torch, Torch-Pruning and fvcore.
"""

from importlib import import_module

#: public name -> the module that defines it
_WHERE = {
    **dict.fromkeys(("ALLOCATIONS", "Allocation", "CountSource", "SearchResult", "group_scores", "keep_masks",
                     "make_allocation", "match_flops", "nominal_fraction", "sensitivity_keys"), "allocation"),
    **dict.fromkeys(("load_pruned", "save_pruned"), "export"),
    **dict.fromkeys(("CostModel", "count_params", "fvcore_macs"), "flops"),
    **dict.fromkeys(("ChannelGroup", "GroupSet", "build_groups", "full_keep", "masked", "prune_physically"), "groups"),
    **dict.fromkeys(("AXES", "DEFAULT_SCORES", "FAMILIES", "SCORES", "Score", "ScoreContext", "importance_score",
                     "lamp", "minmax", "normalize", "register", "register_importance", "resolve_score", "score_names"),
                    "scores"),
    **dict.fromkeys(("cached_scan", "sensitivity_scan"), "sensitivity"),
    "PruneSettings": "resolved",
    "PruningConfig": "settings",
    "run_prune": "run",
}

__all__ = sorted(_WHERE)  # noqa: PLE0605 - the public names are the keys of _WHERE


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
