"""Find the runs of a sweep and read what each stage left there.

A run directory is any folder with a ``train_summary.json``. Runs are grouped by their resolved
training config minus the seed and the output paths: runs that differ in anything else (epochs,
width, learning rate...) are never pooled into one mean; the report says which keys differ.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from axes_pipeline.errors import UserError
from axes_pipeline.runs import read_json

# Keys that legitimately differ between seeds of one experiment.
IGNORED_KEYS = ("seed", "paths", "logger", "ckpt", "callbacks", "stage", "trainer.devices", "data.num_workers",
                "data.data_dir", "trainer.enable_progress_bar")


@dataclass
class Run:
    path: Path
    seed: int
    data: str
    model: str
    width: float
    experiment: str
    train: dict
    signature: str
    flat_config: dict = field(repr=False, default_factory=dict)

    @property
    def group(self) -> str:
        return f"{self.data}-{self.model}-w{self.width:g}"

    def read_csv(self, rel: str) -> pd.DataFrame | None:
        p = self.path / rel
        return pd.read_csv(p) if p.is_file() else None

    def read_json(self, rel: str) -> dict | None:
        p = self.path / rel
        return read_json(p) if p.is_file() else None

    def prune_settings(self) -> dict | None:
        """The pruning protocol this run's curves come from (None when it was not pruned)."""
        summary = self.read_json("prune/prune_summary.json")
        if not summary:
            return None
        pc = (summary.get("config") or {}).get("pruning") or {}
        return {k: pc.get(k) for k in PRUNE_KEYS}


# What makes two runs' pruning curves comparable: seeds pruned under another protocol are never
# paired in the headline.
PRUNE_KEYS = ("mode", "allocation", "targets", "tolerance", "max_fraction", "eval_samples", "eval_seed", "finetune",
              "magnitude", "depthwise_in_group_score", "hybrid_counts_from")


def split_by_pruning(groups: dict[str, list["Run"]]) -> tuple[dict[str, list["Run"]], list[str]]:
    """The groups for the pruning tables: a group whose seeds were pruned under different
    protocols is split (label ``<group> [prune <sig>]``), with a notice naming what differs."""
    out, notices = {}, []
    for label, runs in groups.items():
        by_sig: dict[str, list[Run]] = {}
        settings = {}
        for r in runs:
            s = r.prune_settings()
            if s is None:
                continue
            sig = hashlib.sha1(json.dumps(s, sort_keys=True, default=str).encode()).hexdigest()[:6]
            by_sig.setdefault(sig, []).append(r)
            settings[sig] = s
        if len(by_sig) <= 1:
            out[label] = runs
            continue
        keys = sorted({k for a in settings.values() for b in settings.values() for k in PRUNE_KEYS if a[k] != b[k]})
        notices.append(f"{label}: seeds were pruned with different pruning.{', pruning.'.join(keys)}; their curves "
                       f"are reported as {len(by_sig)} separate groups, never paired")
        for sig, members in by_sig.items():
            out[f"{label} [prune {sig}]"] = members
    return out, notices


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _kept(key: str) -> bool:
    return not any(key == ig or key.startswith(ig + ".") for ig in IGNORED_KEYS)


def discover(roots: list[Path]) -> list[Run]:
    """Every run under ``roots`` (a sweep dir, an experiment dir, or run dirs themselves)."""
    seen, runs = set(), []
    for root in roots:
        for summary in sorted(Path(root).rglob("train_summary.json")):
            path = summary.parent.resolve()
            if path in seen:
                continue
            seen.add(path)
            train = read_json(summary)
            cfg = train.get("config", {})
            flat = {k: v for k, v in _flatten(cfg).items() if _kept(k)}
            sig = hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:8]
            runs.append(Run(path=path, seed=int(cfg.get("seed", -1)), data=cfg["data"]["name"],
                            model=cfg["model"]["name"], width=float(cfg["model"]["width"]),
                            experiment=cfg.get("name", "default"), train=train, signature=sig, flat_config=flat))
    return runs


def group_runs(runs: list[Run]) -> tuple[dict[str, list[Run]], list[str]]:
    """{group label: runs}, and notices about runs whose configs differ beyond the seed."""
    by_group: dict[str, dict[str, list[Run]]] = {}
    for r in runs:
        by_group.setdefault(r.group, {}).setdefault(r.signature, []).append(r)
    groups, notices = {}, []
    for label, sigs in by_group.items():
        if len(sigs) == 1:
            groups[label] = next(iter(sigs.values()))
            continue
        variants = list(sigs.values())
        keys = sorted({k for a in variants for b in variants
                       for k in set(a[0].flat_config) | set(b[0].flat_config)
                       if a[0].flat_config.get(k) != b[0].flat_config.get(k)})
        notices.append(f"{label}: runs differ in {', '.join(keys[:6])}{'...' if len(keys) > 6 else ''}; "
                       f"reported as {len(variants)} separate groups, never pooled")
        for sig, members in sigs.items():
            groups[f"{label} [{sig}]"] = members
    for members in groups.values():
        members.sort(key=lambda r: r.seed)
    return groups, notices


def resolve_roots(paths: list[str]) -> list[Path]:
    roots = [Path(p).resolve() for p in paths]
    missing = [str(p) for p in roots if not p.exists()]
    if missing:
        raise UserError(f"report: {missing[0]} does not exist")
    return roots


def require_runs(runs: list[Run], roots: list[Path]) -> None:
    if not runs:
        raise UserError(f"report: no runs under {', '.join(map(str, roots))} (looked for */train_summary.json, "
                        f"written by train.py); pass report.sweep=<multirun/<experiment>> or report.runs=[...]")
