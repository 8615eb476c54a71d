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

from dataclasses import dataclass, field
from typing import Any

from axes_pipeline.runs import fingerprint, plain

__all__ = ["DEFAULT_NAME", "PROTOCOL_FILE", "Protocol", "describe"]

#: the folder of the backbone's default protocol (``pruning.*`` at the schema's defaults)
DEFAULT_NAME = "default"
#: in each protocol folder: its settings, as :attr:`Protocol.settings`
PROTOCOL_FILE = "protocol.json"

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
    if s.get("schedule") != default.get("schedule") or s.get("steps") != default.get("steps"):
        parts.append(f"iterative{s['steps']}" if s.get("schedule") == "iterative" else str(s.get("schedule")))
    if s.get("finetune") != default.get("finetune"):
        ft = s.get("finetune")
        parts.append(f"ft{ft['epochs']}" if ft else "ft0")
    for key, tag in _TAGS.items():
        if s.get(key) != default.get(key) and key not in ("allocation",):
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
