"""A pruning protocol: what makes two pruning curves comparable, and the folder its results live in.

A score ranks channels inside a layer and, under a global threshold, also decides how many each layer
loses; the allocation, its normalisation, the count source, the schedule and the fine-tune budget can
each change which score wins (METHODS §9). So every protocol is its own result: ``prune/<protocol>/``
holds its points, curves, summary and plots, several protocols coexist for one run, and the report pairs
seeds only within one protocol. What is *not* part of a protocol: the scores swept (a run with fewer
scores adds to its protocol's curves, never removes), and the raw scores of the unpruned network
(``prune/scores/``, shared by every protocol of the checkpoint).

The folder's name says what differs from the backbone's default protocol (``uniform``, ``knapsack``,
``global-lamp``, ``hybrid-l1``, ``iterative3``, ``ft2``, ...) followed by the first six hex digits of the
protocol's fingerprint; the default protocol is ``default``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from axes_pipeline.layout import PROTOCOL_FILE, PRUNE_CURVES, PRUNE_SUMMARY
from axes_pipeline.pruning.settings import PruningConfig
from axes_pipeline.runs import fingerprint, plain, read_json, settings_diff, write_json

__all__ = ["DEFAULT_NAME", "FLAT_LAYOUT", "PROTOCOL_FILE", "Protocol", "adopt_flat_layout", "describe", "protocol_of",
           "protocol_settings", "write_protocol"]

#: the folder of the backbone's default protocol (``pruning.*`` at the schema's defaults)
DEFAULT_NAME = "default"


def protocol_settings(pc: PruningConfig, model: str) -> dict:
    """The settings of ``pc`` that decide a curve besides the score, resolved for backbone ``model``
    (``auto`` → the backbone's allocation, ``max_fraction`` → that allocation's cap, a disabled fine-tune →
    ``None``: a budget of 0). Knobs that only matter to one allocation are present only under it, so
    e.g. ``hybrid_counts_from`` never splits two ``global`` runs."""
    alloc = pc.allocation if pc.allocation != "auto" else pc.allocation_defaults.get(model, "global")
    # the recovery budget: 0 epochs (or enabled=false) is none, so `-m pruning.finetune.epochs=0,2` is two protocols
    on = pc.finetune.epochs > 0 and pc.finetune.enabled is not False
    ft = {k: v for k, v in asdict(pc.finetune).items() if k not in ("enabled", "between_steps")} if on else None
    s = {"allocation": alloc, "normalize": pc.normalize, "mode": pc.mode,
         "targets": sorted({float(t) for t in pc.targets}, reverse=True), "tolerance": float(pc.tolerance),
         "max_fraction": pc.max_fraction.get(alloc), "eval_samples": pc.eval_samples, "eval_seed": pc.eval_seed,
         "magnitude": pc.magnitude, "depthwise_in_group_score": bool(pc.depthwise_in_group_score), "finetune": ft}
    s["schedule"] = str(pc.schedule)
    if s["schedule"] == "iterative":   # k re-scored steps (pruning/schedule.py), a fine-tune between them or not
        s["steps"], s["between_steps"] = int(pc.steps), bool(pc.finetune.between_steps)
    if alloc == "hybrid":
        s["hybrid_counts_from"] = str(pc.hybrid_counts_from)
    if alloc == "sensitivity" or s.get("hybrid_counts_from") == "sensitivity":
        s["sensitivity_fractions"] = pc.sensitivity_fractions
    return plain(s)


def protocol_of(pc: PruningConfig, model: str) -> Protocol:
    """The protocol of ``pc`` for backbone ``model``, named against the schema's defaults for that backbone."""
    return Protocol.of(protocol_settings(pc, model), protocol_settings(PruningConfig(), model))

#: short tags of the settings that rarely differ, used in a folder's name when they do
_TAGS = {"mode": "channels", "targets": "targets", "tolerance": "tol", "max_fraction": "cap",
         "eval_samples": "eval", "eval_seed": "evalseed", "magnitude": "mag", "depthwise_in_group_score": "dw",
         "sensitivity_fractions": "scan"}


@dataclass(frozen=True)
class Protocol:
    """The resolved settings that decide a pruning curve besides the score (plain values), and the name
    of the folder they are stored under."""

    settings: dict = field(repr=False)
    name: str = DEFAULT_NAME

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.settings)

    @property
    def record(self) -> dict:
        """What :data:`PROTOCOL_FILE` holds: the name, the fingerprint, the settings and their words."""
        return {"protocol": self.name, "fingerprint": self.fingerprint, "label": self.label,
                "settings": self.settings}

    @property
    def label(self) -> str:
        """How the report names it: :func:`describe` of its settings."""
        return describe(self.settings)

    @classmethod
    def of(cls, settings: dict, default: dict) -> Protocol:
        """The protocol of ``settings``, named against the backbone's ``default`` protocol settings."""
        settings, default = plain(settings), plain(default)
        if settings == default:
            return cls(settings, DEFAULT_NAME)
        return cls(settings, f"{_difference(settings, default)}-{fingerprint(settings)[:6]}")


def _allocation_tag(s: dict) -> str:
    tag = s["allocation"]
    if tag == "hybrid":
        tag += f"-{s['hybrid_counts_from']}"
    return tag


def _difference(s: dict, default: dict) -> str:
    """The readable part of a folder name: what ``s`` changes from ``default``."""
    parts = []
    if any(s.get(k) != default.get(k) for k in ("allocation", "hybrid_counts_from", "normalize")):
        tag = _allocation_tag(s)
        parts.append(f"{tag}-{s['normalize']}" if s.get("normalize") != default.get("normalize") else tag)
    if any(s.get(k) != default.get(k) for k in ("schedule", "steps", "between_steps")):
        parts.append(f"iterative{s['steps']}" + ("ft" if s.get("between_steps") else "")
                     if s.get("schedule") == "iterative" else str(s.get("schedule")))
    if s.get("finetune") != default.get("finetune"):
        ft = s.get("finetune")
        parts.append(f"ft{ft['epochs']}" if ft else "ft0")
    for key, tag in _TAGS.items():
        # the cap is the allocation's own: another allocation's cap is named by the allocation already
        if key == "max_fraction" and s.get("allocation") != default.get("allocation"):
            continue
        # the scan's fractions count only under a scan's counts, which the allocation's tag names already
        if key == "sensitivity_fractions" and default.get(key) is None:
            continue
        if s.get(key) != default.get(key):
            parts.append(tag)
    return "-".join(parts) or "custom"


def describe(s: dict[str, Any]) -> str:
    """A protocol in words for tables and figures: ``global (minmax), one-shot, no fine-tune``."""
    alloc = _allocation_tag(s)
    if s.get("allocation") in ("global", "knapsack", "hybrid"):
        alloc += f" ({s.get('normalize', 'minmax')})"
    schedule = f"iterative ×{s['steps']}" if s.get("schedule") == "iterative" else "one-shot"
    ft = s.get("finetune")
    budget = f"fine-tune {ft['epochs']} ep" if ft else "no fine-tune"
    mode = "" if s.get("mode", "flops") == "flops" else f", {s['mode']}"
    return f"{alloc}, {schedule}, {budget}{mode}"


def write_protocol(folder: Path, protocol: Protocol) -> None:
    """Write :data:`PROTOCOL_FILE` into ``folder``; when the folder held other settings under this name (a
    schema default changed since), say so: its points are then checked one by one against their keys."""
    path = folder / PROTOCOL_FILE
    try:
        old = read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict) and old.get("fingerprint") not in (None, protocol.fingerprint):
        print(f"prune: note: {path} recorded other settings ({settings_diff(old.get('settings') or {}, protocol.settings)}); "
              "replaced, and every stored point is checked against its key")
    if old != plain(protocol.record):
        write_json(path, protocol.record)


#: what an older ``prune/`` held directly, before each protocol had a folder of its own
FLAT_LAYOUT = (PRUNE_CURVES, PRUNE_SUMMARY, "unpruned.json", "points", "models", "prune_curves.png",
               "prune_curves_ft.png", "prune_sweep_*.png")


def adopt_flat_layout(stage: Path, model: str, fallback: Protocol, folder_of) -> str | None:
    """Move the results of an older layout (``prune/prune_curves.csv``, ``prune/points/`` ... directly in
    ``stage``) into the folder of the protocol they were made under: the one its ``prune_summary.json``
    records (``folder_of(name)``), else ``fallback``'s (a run killed before its summary; each moved point is
    still checked against its key before it is reused). Nothing is recomputed. Returns the protocol's name,
    or None when there was nothing to move."""
    found = [p for pattern in FLAT_LAYOUT for p in sorted(stage.glob(pattern))]
    if not any(p.name in ("points", PRUNE_CURVES) for p in found):
        return None
    protocol = fallback
    try:
        old = read_json(stage / PRUNE_SUMMARY)
        pc = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PruningConfig),
                                                 (old.get("config") or {})["pruning"]))
        protocol = protocol_of(pc, model)
    except Exception:  # noqa: BLE001 - no summary, or one of an older schema: the fallback, said below
        print(f"prune: note: {stage / PRUNE_SUMMARY} does not say which settings made {stage}'s results; "
              f"they are moved into {fallback.name}/ and each point is checked against its key there")
    dest = folder_of(protocol.name)
    dest.mkdir(parents=True, exist_ok=True)
    left = []
    for p in found:
        if (dest / p.name).exists():
            left.append(p.name)
            continue
        p.rename(dest / p.name)
    write_protocol(dest, protocol)
    print(f"prune: moved the results of the older layout ({stage}/prune_curves.csv ...) into {dest} "
          f"(protocol {protocol.name}: {protocol.label}); nothing recomputed"
          + (f"; left in place, since {dest.name}/ has its own: {', '.join(left)}" if left else ""))
    return protocol.name
