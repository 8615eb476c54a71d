"""Find the runs of a sweep and read what each stage left there.

A run directory is any folder with a ``train_summary.json``. Runs are grouped by their resolved
training config minus the seed and the output paths: runs that differ in anything else (epochs,
width, learning rate...) are never pooled into one mean; the report says which keys differ.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from axes_pipeline.environment import label as env_label
from axes_pipeline.errors import UserError
from axes_pipeline.layout import (
    ANALYZE_SUMMARY,
    AXES_CSV,
    AXES_FINGERPRINT,
    BEST_CKPT,
    CHECKPOINTS,
    LAST_CKPT,
    LAYERS_CSV,
    PROTOCOL_FILE,
    PRUNE_CURVES,
    PRUNE_SUMMARY,
    TRAIN_SUMMARY,
    RunId,
    RunLayout,
    broken_chains,
)
from axes_pipeline.pruning.protocol import DEFAULT_NAME
from axes_pipeline.runs import file_digest, fingerprint, flatten, read_json, settings_diff
from axes_pipeline.tables import DamagedTable, Schema, read_table

# Keys that legitimately differ between seeds of one experiment.
IGNORED_KEYS = ("seed", "paths", "logger", "ckpt", "callbacks", "stage", "trainer.devices", "data.num_workers",
                "data.data_dir", "trainer.enable_progress_bar",
                # the axes knobs every stage's config carries: they do not decide the trained weights
                "device", "capture", "metrics", "graphs", "gradients", "plots", "plugins")


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
    #: the pruning protocol whose results this view of the run reads (``prune/<protocol>/``); the default one
    #: unless :meth:`in_protocol` made another view
    protocol: str = DEFAULT_NAME

    @property
    def id(self) -> RunId:
        return RunId(self.experiment, self.data, self.model, self.width, self.seed)

    @property
    def group(self) -> str:
        """The seeds' label: the folder above them (``RunId.group``, e.g. ``digits-resnet18-w1.0``)."""
        return self.id.group

    @property
    def layout(self) -> RunLayout:
        return RunLayout.at(self.id, self.path.parent).in_folder(self.path)

    def prune_rel(self, name: str) -> str:
        """The path (relative to the run) of file ``name`` of this view's pruning protocol."""
        return f"prune/{self.protocol}/{name}"

    def protocols(self) -> list[str]:
        """The pruning protocols this run has results of (``prune/<protocol>/protocol.json``), by name."""
        return [p.name for p in self.layout.protocol_dirs()]

    def in_protocol(self, protocol: str) -> Run:
        """This run seen through one pruning protocol: the same run (its skipped inputs, digests and cache are
        shared), reading ``prune/<protocol>/``."""
        return replace(self, protocol=protocol)

    def artifacts(self) -> dict[str, list[Path]]:
        """This run's results by artifact kind (checkpoint, axes, curves), for the report's lineage."""
        layout = self.layout
        found = self.protocols()   # this view's protocol, else the first one pruned (the curves' wandb artifact)
        protocol = self.protocol if self.protocol in found or not found else found[0]
        analyze, prune = layout.stage_dir("analyze"), layout.protocol_dir(protocol)
        return {"checkpoint": [layout.checkpoints / BEST_CKPT], "axes": [analyze / AXES_CSV, analyze / LAYERS_CSV],
                "curves": [prune / PRUNE_CURVES, prune / PRUNE_SUMMARY]}

    @property
    def digest(self) -> str:
        """This run's identity: the content digest of its ``best.ckpt`` as training recorded it (else of the file,
        else of its ``train_summary.json``): a copy of the folder has the same, a retrained seed another."""
        recorded = (self.train.get("checkpoint_digests") or {}).get(BEST_CKPT)
        if recorded:
            return str(recorded)
        best = self.path / CHECKPOINTS / BEST_CKPT
        return file_digest(best) if best.is_file() else file_digest(self.path / TRAIN_SUMMARY)

    #: {relative path: why it was left out} of every input of this run that could not be used
    skipped: dict = field(repr=False, default_factory=dict)
    #: {relative path: content digest} of every input the report read
    inputs: dict = field(repr=False, default_factory=dict)
    _cache: dict = field(repr=False, default_factory=dict)

    def skip(self, rel: str, reason: str) -> None:
        """Record that input ``rel`` of this run was left out of the report, and why."""
        self.skipped.setdefault(rel, reason)

    @property
    def stale(self) -> dict[str, str]:
        """{``analyze/<table>``: why} of every analysis table not computed from this run's ``axes.csv`` (the chain
        rule: :func:`stale_tables`); the report leaves each out, named under skipped inputs."""
        if "_stale" not in self._cache:
            self._cache["_stale"] = stale_tables(self.path / "analyze", self.id)
        return self._cache["_stale"]

    def _refused(self, rel: str) -> bool:
        if rel in self.stale:
            self.skip(rel, self.stale[rel])
            return True
        return False

    @property
    def environment(self) -> str:
        """Where this run was trained, in a few words (:func:`environment.label`): the report's runs table, and a
        notice where one group mixes machines or thread counts (their weights are not bit-identical)."""
        resumed = self.train.get("resumed_environment")
        return env_label(self.train.get("environment")) + (f"; resumed under {env_label(resumed)}" if resumed else "")

    def read_csv(self, rel: str) -> pd.DataFrame | None:
        """Table ``rel`` of this run, checked against its schema (:data:`REPORT_SCHEMAS`); None when
        absent (the stage did not run) or damaged (then recorded in :attr:`skipped`, never silent)."""
        if rel not in self._cache:
            self._cache[rel] = self._read_csv(rel)
        df = self._cache[rel]
        return None if df is None else df.copy()

    def _read_csv(self, rel: str) -> pd.DataFrame | None:
        p = self.path / rel
        if not p.is_file() or self._refused(rel):
            return None
        key = f"prune/{p.name}" if rel.startswith("prune/") else rel   # one schema for every protocol's file
        schema = REPORT_SCHEMAS.get(key)
        try:
            if schema is None:
                df = pd.read_csv(p)
            else:
                df = read_table(p, schema, rebuild=_rebuild(rel))
                if key == f"prune/{PRUNE_CURVES}":
                    _complete_curves(df, p, _rebuild(rel))
        except DamagedTable as err:
            self.skip(rel, str(err))
            return None
        except Exception as err:  # noqa: BLE001 - unreadable (binary, truncated mid-quote): same answer
            self.skip(rel, f"{p} cannot be read as CSV ({type(err).__name__})")
            return None
        self.inputs[rel] = file_digest(p)
        return df

    def read_json(self, rel: str) -> dict | None:
        p = self.path / rel
        if not p.is_file() or self._refused(rel):
            return None
        try:
            found = read_json(p)
        except (OSError, ValueError) as err:
            self.skip(rel, f"{p} is not valid JSON ({type(err).__name__}); rebuild it with `{_rebuild(rel)}`")
            return None
        self.inputs[rel] = file_digest(p)
        return found

    def prune_settings(self) -> dict | None:
        """The settings of this view's pruning protocol (``protocol.json``; None when it has no results)."""
        if not (self.path / self.prune_rel(PRUNE_SUMMARY)).is_file():
            return None
        record = self.read_json(self.prune_rel(PROTOCOL_FILE)) or {}
        return record.get("settings") or {"fingerprint": "(none recorded)"}


def split_by_pruning(groups: dict[str, list[Run]]) -> tuple[dict[str, dict[str, list[Run]]], list[str]]:
    """The groups for the pruning tables, per pruning protocol: ``{protocol: {label: runs}}``, each run seen
    through that protocol (:meth:`Run.in_protocol`). Seeds are paired only within one protocol: where seeds
    of a group carry one protocol name under different settings (a schema default changed between them), the
    group is split (label ``<group> [prune <sig>]``) with a notice naming what differs. A run whose ``prune/``
    still has the older layout (no protocol folders) is listed under skipped inputs with the command that
    moves it."""
    def notice(label: str, settings: list[dict]) -> str:
        first, *rest = settings
        diffs = "; ".join(settings_diff(first, other) for other in rest)
        return (f"{label}: seeds were pruned under one protocol name with different settings ({diffs}); their "
                f"curves are reported as {len(settings)} separate groups, never paired")

    by_protocol: dict[str, dict[str, list[Run]]] = {}
    notices: list[str] = []
    for label, runs in groups.items():
        for r in runs:
            if not r.protocols() and (r.path / "prune" / PRUNE_CURVES).is_file():
                r.skip(f"prune/{PRUNE_CURVES}", "pruning results in the older layout (prune/prune_curves.csv, before "
                       "each protocol had a folder); run prune.py on this run once (e.g. `python prune.py "
                       f"{' '.join(r.id.overrides())}`): it moves them into prune/<protocol>/ without recomputing")
        names = sorted({p for r in runs for p in r.protocols()}, key=lambda p: (p != DEFAULT_NAME, p))
        for name in names:
            views = {label: [r.in_protocol(name) for r in runs if name in r.protocols()]}
            split, said = _split(views, Run.prune_settings, "prune", notice)
            by_protocol.setdefault(name, {}).update(split)
            notices += [f"protocol {name}: {n}" for n in said]
    return by_protocol, notices


def _split(groups: dict[str, list[Run]], settings_of, tag: str, notice) -> tuple[dict[str, list[Run]], list[str]]:
    """``groups`` split where a group's runs differ in ``settings_of(run)`` (None: the run lacks that
    stage and does not count), labelled ``<group> [<tag> <sig>]``, each split named by ``notice(label,
    [settings of each part])``: never one mean, nor one pairing, over runs measured differently."""
    out, notices = {}, []
    for label, runs in groups.items():
        by_sig: dict[str, list[Run]] = {}
        settings = {}
        for r in runs:
            s = settings_of(r)
            if s is None:
                continue
            sig = fingerprint(s)[:6]
            by_sig.setdefault(sig, []).append(r)
            settings[sig] = s
        if len(by_sig) <= 1:
            out[label] = runs
            continue
        notices.append(notice(label, list(settings.values())))
        for sig, members in by_sig.items():
            out[f"{label} [{tag} {sig}]"] = members
    return out, notices


# What decides a run's axes besides its trained weights: analyze/axes_fingerprint.json (data identity,
# capture.*, metrics.*, graphs, gradients) minus what legitimately differs between seeds: the checkpoint.
AXES_SEED_KEYS = ("ckpt_digest",)


def axes_settings(run: Run) -> dict | None:
    """How this run's axes tables were measured (None when it was not analysed); a table without its
    fingerprint reads as ``{"fingerprint": "(none recorded)"}``, pooled only with others like it."""
    if not (run.path / "analyze" / "layers.csv").is_file():
        return None
    fp = run.read_json("analyze/axes_fingerprint.json")
    if not fp:
        return {"fingerprint": "(none recorded)"}
    return {k: v for k, v in fp.items() if k not in AXES_SEED_KEYS}


def split_by_axes(groups: dict[str, list[Run]]) -> tuple[dict[str, list[Run]], list[str]]:
    """The groups for the analysis tables (layers, reference, lesions, propagation): a group whose seeds
    were analysed under different settings (``capture.n_cal``, any ``capture.*``/``metrics.*``...) is
    split (label ``<group> [axes <sig>]``), with a notice naming what differs: never one mean of both."""
    def notice(label: str, settings: list[dict]) -> str:
        first, *rest = settings
        diffs = "; ".join(settings_diff(first, other) for other in rest)
        return (f"{label}: seeds were analysed with different settings ({diffs}); their analysis tables "
                f"are reported as {len(settings)} separate groups, never pooled")

    return _split(groups, axes_settings, "axes", notice)


def provenance_notices(groups: dict[str, list[Run]]) -> list[str]:
    """Where the report would put side by side the axes of one network and the pruning results of
    another: a run whose ``analyze/`` and ``prune/`` results come from different checkpoints (content
    digests), or whose axes scores were pruned with axes computed under other settings than its tables."""
    notices = []
    for label, runs in groups.items():
        for r in (run.in_protocol(p) for run in runs for p in run.protocols()):   # every protocol's results
            axes = r.read_json("analyze/axes_fingerprint.json") if (r.path / "analyze" / "axes.csv").is_file() else None
            prune = r.read_json(r.prune_rel(PRUNE_SUMMARY)) if (r.path / r.prune_rel(PRUNE_CURVES)).is_file() else None
            if not axes or not prune:
                continue
            a, p = axes.get("ckpt_digest"), prune.get("checkpoint_digest")
            if a and p and a != p:
                notices.append(f"{label} seed {r.seed}: its axes (analyze/, checkpoint {a[:8]}) and its pruning curves "
                               f"(prune/{r.protocol}/, checkpoint {p[:8]}) come from different checkpoints; rerun "
                               f"`python analyze.py` "
                               f"and `python prune.py` on the run's checkpoint before comparing them")
            elif (used := prune.get("axes_fingerprint")) and used != axes:
                notices.append(f"{label} seed {r.seed}: its axes scores were pruned with axes computed under other "
                               f"settings than its analysis tables ({settings_diff(axes, used)}; "
                               f"prune/{r.protocol}/, prune/axes/)")
    return notices


def stale_tables(folder: Path, run_id: RunId) -> dict[str, str]:
    """The chain rule, read back: {``analyze/<table>``: why} for each analysis table in ``folder`` not computed from
    the run's ``axes.csv`` (:func:`~axes_pipeline.layout.broken_chains`). A run without an axes fingerprint (an
    older run, hand-made tables) has nothing to check against: its tables are read, and :func:`split_by_axes`
    keeps it apart."""
    try:
        axes_fp = read_json(folder / AXES_FINGERPRINT)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        axes_fp = "(unreadable)"
    out = {}
    for name, (have, why) in broken_chains(folder, axes_fp).items():
        cmd = run_id.command("analyze", f"analysis={name}")
        for t in have:
            out[f"analyze/{t}"] = (f"{folder / t} was not computed from the run's {AXES_CSV} ({why}); left out: "
                                   f"rebuild it with `{cmd}` and the capture/metrics settings of its {AXES_CSV}")
    return out


def chain_notices(groups: dict[str, list[Run]]) -> list[str]:
    """What the report must say about the chain of each group's results besides what it skips: the epochs of a
    training dynamics that had no checkpoint, and a group whose seeds were trained in different environments
    (thread count, processor, torch build: the same seed is then not bit-identical)."""
    notices = []
    for group, runs in groups.items():
        for r in runs:
            dyn = ((r.read_json(f"analyze/{ANALYZE_SUMMARY}") or {}).get("dynamics") or {})
            for seed, epochs in (dyn.get("missing_epochs") or {}).items():
                notices.append(f"{group} seed {r.seed}: training dynamics has no checkpoint for epoch"
                               f"{'s' if len(epochs) > 1 else ''} {', '.join(map(str, epochs))} of seed {seed} "
                               f"(analyze/dynamics.csv skips them)")
        envs = {}
        for r in runs:
            envs.setdefault(r.environment, []).append(r.seed)
        if len(envs) > 1:
            notices.append(f"{group}: its seeds were trained in different environments ("
                           + "; ".join(f"seeds {', '.join(map(str, s))}: {e}" for e, s in envs.items())
                           + "); another thread count or processor gives other weights for one seed")
    return notices


def one_run_per_identity(runs: list[Run], skipped: list[dict] | None = None) -> list[Run]:
    """Runs identified by their checkpoint: an exact copy of a run (the same seed and content digest, e.g. a
    backup folder inside the sweep) is counted once; the same seed of one experiment with two different digests
    (two networks claiming one identity) is refused (both left out and listed), never paired nor pooled."""
    by_key: dict[tuple, list[Run]] = {}
    for r in runs:
        by_key.setdefault((r.group, r.signature, r.seed), []).append(r)
    keep: set[int] = set()
    for (_, _, seed), same in by_key.items():
        digests = {}
        for r in sorted(same, key=lambda r: str(r.path)):
            digests.setdefault(r.digest, []).append(r)
        if len(digests) > 1:
            where = "; ".join(f"{rs[0].path} (checkpoint {d[:8]})" for d, rs in digests.items())
            for r in same:
                _skip_run(skipped, r, f"seed {seed} has {len(digests)} different networks ({where}); both are left "
                                      f"out, never pooled: remove or rename (name=) the one that is not this seed's")
            continue
        first, *copies = next(iter(digests.values()))
        keep.add(id(first))
        for r in copies:
            _skip_run(skipped, r, f"an exact copy of {first.path} (the same checkpoint, {r.digest[:8]}); counted once")
    return [r for r in runs if id(r) in keep]


def _skip_run(skipped: list[dict] | None, r: Run, reason: str) -> None:
    if skipped is not None:
        skipped.append({"run": str(r.path), "seed": r.seed, "file": "train_summary.json", "reason": reason})


def unfinished_runs(roots: list[Path], skipped: list[dict]) -> None:
    """Every run folder under ``roots`` with checkpoints but no ``train_summary.json`` (training killed, or
    still running) appended to ``skipped`` with the command that finishes it (train.py resumes from last.ckpt)."""
    seen = set()
    for root in roots:
        for ckpts in sorted(Path(root).rglob(CHECKPOINTS)):
            run = ckpts.parent.resolve()
            if not ckpts.is_dir() or run in seen or (run / TRAIN_SUMMARY).is_file():
                continue
            seen.add(run)
            m = re.fullmatch(r"seed(\d+)", run.name)
            skipped.append({"run": str(run), "seed": int(m.group(1)) if m else None, "file": TRAIN_SUMMARY,
                            "reason": f"training did not finish (killed, or still running: {run / CHECKPOINTS} but no "
                                      f"{TRAIN_SUMMARY}): the run "
                                      f"is in no table; finish it with `{_train_command(run)}` (it resumes from "
                                      f"{LAST_CKPT})"})


def _train_command(run: Path) -> str:
    """The command that trained ``run``: its Hydra overrides (``.hydra/train/overrides.yaml``), else a placeholder."""
    try:
        import yaml

        over = yaml.safe_load((run / ".hydra" / "train" / "overrides.yaml").read_text())
        return " ".join(["python train.py", *map(str, over)])
    except Exception:  # noqa: BLE001 - only a hint
        return "python train.py <the run's overrides>"


def _kept(key: str) -> bool:
    return not any(key == ig or key.startswith(ig + ".") for ig in IGNORED_KEYS)


def discover(roots: list[Path], skipped: list[dict] | None = None) -> list[Run]:
    """Every run under ``roots`` (a sweep dir, an experiment dir, or run dirs themselves).

    A run whose ``train_summary.json`` cannot be read is left out and appended to ``skipped``
    (``{"run", "seed", "file", "reason"}``), so the report can say so."""
    seen, runs = set(), []
    for root in roots:
        for summary in sorted(Path(root).rglob("train_summary.json")):
            path = summary.parent.resolve()
            if path in seen:
                continue
            seen.add(path)
            try:
                train = read_json(summary)
                cfg = train.get("config", {})
                seed, data, model = int(cfg.get("seed", -1)), cfg["data"]["name"], cfg["model"]["name"]
                width = float(cfg["model"]["width"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                if skipped is not None:
                    skipped.append({"run": str(path), "seed": None, "file": "train_summary.json",
                                    "reason": f"{summary} is damaged ({type(err).__name__}: {err}); the run is "
                                              f"left out of every table (rerun `python train.py` for it)"})
                continue
            flat = {k: v for k, v in flatten(cfg).items() if _kept(k)}
            sig = fingerprint(flat)[:8]
            run = Run(path=path, seed=seed, data=data, model=model, width=width,
                      experiment=cfg.get("name", "default"), train=train, signature=sig, flat_config=flat)
            run.inputs["train_summary.json"] = file_digest(summary)
            runs.append(run)
    if skipped is not None:
        unfinished_runs(roots, skipped)
    return one_run_per_identity(runs, skipped)


def skipped_inputs(runs: list[Run]) -> list[dict]:
    """Every input a run could not contribute (damaged table, unreadable summary), with the reason."""
    return [{"run": str(r.path), "seed": r.seed, "file": rel, "reason": why}
            for r in runs for rel, why in r.skipped.items()]


# ---------------------------------------------------------------------------------------------
# Schemas of the per-run tables the report reads (checked on read; a damaged one is skipped and
# listed in the report). Only what the report uses is required: older runs may lack other columns.
# ---------------------------------------------------------------------------------------------

def _rebuild(rel: str) -> str:
    """The command that rebuilds a run's file ``rel`` (``<stage>/<name>``)."""
    stage = rel.split("/")[0]
    return f"python {stage}.py <the run's overrides>" if stage in ("prune", "analyze") else "the stage that wrote it"


# the per-layer quantities the report summarises (any may be absent from an older run)
LAYER_COLS = ("align_input_capture_task_info", "align_peer_overlap_target_excess", "align_hull_score_task_unique",
              "modularity_gap", "null_modularity_gap", "nmi", "ari", "hull_size_mean", "hull_saturated_frac", "s3_s2")

REPORT_SCHEMAS: dict[str, Schema] = {
    f"prune/{PRUNE_CURVES}": Schema(
        PRUNE_CURVES, columns={"score": "str", "axis": "str", "achieved_flops": "float",
                                     "acc_before_ft": "float", "target_flops": "float", "draw": "int"},
        finite=("achieved_flops", "acc_before_ft"), optional=("target_flops", "draw")),
    "analyze/layers.csv": Schema("layers.csv", columns={"layer": "str", "layer_index": "int",
                                                        **dict.fromkeys(LAYER_COLS, "float")}, optional=LAYER_COLS),
    "analyze/dynamics.csv": Schema("dynamics.csv", columns={"epoch": "int", "layer": "str"}),
    "analyze/definitions.csv": Schema("definitions.csv", columns={"point": "str", "spatial": "str", "checkpoint": "str",
                                                                  "layer": "str"}),
    "analyze/propagation.csv": Schema("propagation.csv", columns={"pairing": "str", "rho": "float"},
                                      optional=("pairing", "rho")),
}


def _complete_curves(df: pd.DataFrame, path: Path, rebuild: str) -> None:
    """Every score (and random draw) of a pruning curve has the same number of points: a file cut
    short loses the last points of its last score, which would otherwise shrink that score's AUC."""
    keys = ["score", "draw"] if "draw" in df else ["score"]
    counts = df.groupby(keys, sort=False).size()
    if counts.nunique() > 1:
        raise DamagedTable(f"{path} is damaged (truncated: {counts.idxmin()} has {counts.min()} point(s), the others up to "
                           f"{counts.max()}); rebuild it with `{rebuild}`")


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


def resolve_roots(paths: list[str], under: Path | None = None) -> list[Path]:
    """``paths`` as absolute folders, each of which must exist; a relative one is taken below ``under``
    (``paths.output_root`` for ``report.sweep``: the root bounds what a stage reads and writes, not the
    working directory), else below the working directory."""
    roots = [(Path(p) if under is None or Path(p).is_absolute() else Path(under) / p).resolve() for p in paths]
    missing = [str(p) for p in roots if not p.exists()]
    if missing:
        raise UserError(f"report: {missing[0]} does not exist")
    return roots


def require_runs(runs: list[Run], roots: list[Path]) -> None:
    if not runs:
        raise UserError(f"report: no runs under {', '.join(map(str, roots))} (looked for */train_summary.json, "
                        f"written by train.py); pass report.sweep=<multirun/<experiment>> or report.runs=[...]")
