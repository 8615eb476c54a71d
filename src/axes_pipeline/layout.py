"""A run's identity and where everything it writes lives: the one home of both.

:class:`RunId` is what names a trained run (experiment name, data, model, width, seed) and its
:meth:`RunId.slug`, the one spelling used by the run folder, Hydra's sweep subfolder, the wandb run
name and the report's labels. :class:`RunLayout` is where a run's files are: the run folder, every
artifact by name, the stage folders (``analyze/``, ``prune/``, another checkpoint's ``analyze@<stem>/``),
the folders where a trained run may be found, and the command that makes a missing artifact.
Every file name a stage writes and another reads is a constant here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from axes_pipeline.runs import fingerprint, flatten, read_record

#: the two kinds of run folder below the output root: single runs and ``-m`` sweeps
RUN_KINDS = ("runs", "multirun")

# ---- artifact names (a stage writes them, another reads them) --------------------------------
CHECKPOINTS = "checkpoints"
BEST_CKPT, LAST_CKPT = "best.ckpt", "last.ckpt"
TRAIN_SUMMARY = "train_summary.json"
TRAIN_SETTINGS = "train_settings.json"
AXES_CSV, LAYERS_CSV = "axes.csv", "layers.csv"
AXES_FINGERPRINT = "axes_fingerprint.json"
ANALYZE_SUMMARY = "analyze_summary.json"
PRUNE_CURVES, PRUNE_SUMMARY = "prune_curves.csv", "prune_summary.json"
#: The tables each analysis after the axes writes into the stage folder (``analyze/``): every one is computed
#: from the axes of the run (the table, or the axes knobs it was measured with), so each analysis records the
#: fingerprint of the ``axes.csv`` it read beside them (:func:`analysis_record`), and analyze and the report check
#: that chain (docs/reliability.md, "the chain rule").
ANALYSIS_TABLES: dict[str, tuple[str, ...]] = {
    "lesion": ("lesions.csv", "lesion_binned.csv", "lesion_summary.json"),
    "propagation": ("propagation.csv", "propagation_refused.csv"),
    "definitions": ("definitions.csv",),
    "dynamics": ("dynamics.csv", "dynamics_curves.csv", "dynamics_seeds.csv"),
}
#: in each pruning protocol's folder ``prune/<protocol>/``: the protocol's settings and name
PROTOCOL_FILE = "protocol.json"
#: where each point shows how its allocation pruned every layer (one row per point and layer)
LAYER_ALLOCATION = "layer_allocation.csv"
#: the folders of ``prune/`` shared by every protocol of a checkpoint (never a protocol's name: those end
#: in a fingerprint, or are ``default``)
PRUNE_SHARED = ("scores", "axes", "latency")
PLOTS = "plots"
#: the stage folders of a run (another checkpoint's results go to ``<stage>@<stem>``)
STAGES = ("analyze", "prune")


def analysis_record(name: str) -> str:
    """The record of analysis ``name``'s inputs in the stage folder (``lesion_inputs.json``): the fingerprint of
    the axes it was computed from (``runs.write_record``)."""
    return f"{name}_inputs.json"


def analysis_inputs(axes_fp) -> dict:
    """The fingerprint an analysis records of its inputs (:func:`analysis_record`): that of the ``axes.csv`` it read
    (``axes_fingerprint.json``'s content), flat (``axes.csv.capture.point``) so that a mismatch names the keys that
    differ. One shape, written by analyze and checked by analyze and the report."""
    return flatten({AXES_CSV: axes_fp})


def broken_chains(folder: Path, axes_fp, skip: tuple[str, ...] | list[str] = ()) -> dict[str, tuple[list[str], str]]:
    """The chain rule, checked: {analysis: (its tables found in ``folder``, why)} for each analysis (but ``skip``)
    whose record does not carry ``analysis_inputs(axes_fp)``: computed from other axes than the stage folder's
    ``axes.csv`` (fingerprint ``axes_fp``), or recording none. Read by analyze (it marks them stale) and by the
    report (it leaves them out)."""
    out = {}
    for name, tables in ANALYSIS_TABLES.items():
        have = [t for t in tables if (Path(folder) / t).is_file()]
        if name in skip or not have:
            continue
        record, why = read_record(Path(folder) / analysis_record(name), analysis_inputs(axes_fp))
        if record is None:
            out[name] = (have, why or f"{analysis_record(name)} is missing")
    return out


@dataclass(frozen=True)
class RunId:
    """What names a trained run: every stage given the same five finds the same folder."""

    name: str       # the experiment (``name=``; an overlay sets it)
    data: str
    model: str
    width: float
    seed: int

    def __post_init__(self) -> None:
        # one spelling of the width everywhere: Python's float (``0.25``, ``1.0``), as the folder has always had it
        object.__setattr__(self, "width", float(self.width))
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def group(self) -> str:
        """The seeds' common label: ``<data>-<model>-w<width>`` (a report group, the folder above the seeds)."""
        return f"{self.data}-{self.model}-w{self.width}"

    def slug(self, sep: str = "/") -> str:
        """``<data>-<model>-w<width>/seed<seed>``: the run folder below the experiment's (``sep="/"``), and with
        ``sep="-"`` the wandb run name's stem and a file-name-safe label."""
        return f"{self.group}{sep}seed{self.seed}"

    def with_seed(self, seed: int) -> RunId:
        return replace(self, seed=int(seed))

    def overrides(self) -> list[str]:
        """The command-line overrides that name this run (``name=`` only when it is not the default)."""
        return [*([f"name={self.name}"] if self.name != "default" else []), f"data={self.data}",
                f"model={self.model}", f"model.width={self.width}", f"seed={self.seed}"]

    def command(self, stage: str, *extra: str) -> str:
        """The command that runs ``stage`` (train, analyze, prune) on this run."""
        return " ".join(["python", f"{stage}.py", *self.overrides(), *extra])


@dataclass(frozen=True)
class RunLayout:
    """Where the files of run :attr:`id` are. ``dir`` is the run folder: ``<root>/<kind>/<name>/<slug>``
    by default, or the folder holding a checkpoint named by ``ckpt=`` (:meth:`for_checkpoint`)."""

    id: RunId
    root: Path      # paths.output_root, absolute
    kind: str = "runs"   # runs | multirun: this process' mode
    folder: Path | None = None   # set when the run folder is not the default one (a ckpt= elsewhere)

    @classmethod
    def at(cls, run_id: RunId, root: str | Path, kind: str = "runs") -> RunLayout:
        if kind not in RUN_KINDS:
            raise ValueError(f"run kind {kind!r} is not one of {RUN_KINDS}")
        return cls(run_id, Path(root).resolve(), kind)

    @property
    def dir(self) -> Path:
        return self.folder if self.folder is not None else self.default_dir(self.kind)

    def default_dir(self, kind: str) -> Path:
        return self.root / kind / self.id.name / self.id.slug()

    def candidates(self) -> list[Path]:
        """Where a run with this identity may live: this mode's folder first, then the other mode's (so
        ``analyze.py seed=1`` finds a run trained by ``train.py -m seed=1,2`` and vice versa)."""
        if self.folder is not None:
            return [self.folder]
        return [self.default_dir(self.kind), *(self.default_dir(k) for k in RUN_KINDS if k != self.kind)]

    def in_folder(self, folder: str | Path) -> RunLayout:
        """This run's layout with its files in ``folder`` (a candidate found, a checkpoint's owner)."""
        return replace(self, folder=Path(folder))

    def found(self) -> RunLayout:
        """This layout at the first candidate that holds a run (a summary or checkpoints), else as it is."""
        for cand in self.candidates():
            if (cand / TRAIN_SUMMARY).is_file() or (cand / CHECKPOINTS).is_dir():
                return self.in_folder(cand)
        return self

    def with_seed(self, seed: int) -> RunLayout:
        """The same experiment's run of another seed (in its default folder)."""
        return replace(self, id=self.id.with_seed(seed), folder=None)

    def for_checkpoint(self, ckpt: Path) -> RunLayout:
        """Where a stage writes for checkpoint ``ckpt``: the run folder holding it when that lies below the
        output root, else ``<root>/external/<slug>-<digest of the path>`` (stable for one checkpoint path,
        distinct for two checkpoints of the same settings): no stage writes outside the output root."""
        ckpt = Path(ckpt).resolve()
        owner = ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt.parent
        if owner == self.root or self.root in owner.parents:
            return self.in_folder(owner)
        return self.in_folder(self.external_dir(ckpt))

    def external_dir(self, ckpt: Path) -> Path:
        return self.root / "external" / f"{self.id.slug('-')}-{fingerprint({'ckpt': str(ckpt)})[:8]}"

    @property
    def is_external(self) -> bool:
        return self.folder is not None and self.root / "external" in self.folder.parents

    # ---- files of the run folder
    @property
    def checkpoints(self) -> Path:
        return self.dir / CHECKPOINTS

    @property
    def train_summary(self) -> Path:
        return self.dir / TRAIN_SUMMARY

    @property
    def train_settings(self) -> Path:
        return self.dir / TRAIN_SETTINGS

    def default_ckpt(self) -> Path | None:
        """The checkpoint a stage uses when none is named: ``best.ckpt``, else ``last.ckpt``; None if neither."""
        for name in (BEST_CKPT, LAST_CKPT):
            if (self.checkpoints / name).is_file():
                return self.checkpoints / name
        return None

    def stage_dir(self, stage: str, tag: str = "") -> Path:
        """Where ``stage`` (analyze, prune) writes the results of a checkpoint: ``<run>/<stage>`` for the run's
        default checkpoint, ``<run>/<stage>@<ckpt stem>`` (``tag``) for any other."""
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} has no folder; one of {STAGES}")
        return self.dir / f"{stage}{tag}"

    def protocol_dir(self, protocol: str, tag: str = "") -> Path:
        """Where one pruning protocol's results of a checkpoint live: ``<run>/prune<tag>/<protocol>/`` (its
        points, curves, summary, plots, :data:`PROTOCOL_FILE`); the score caches beside it in ``prune<tag>/``
        (:data:`PRUNE_SHARED`) are shared by every protocol of that checkpoint."""
        if not protocol or "/" in protocol or protocol in PRUNE_SHARED or protocol.startswith("."):
            raise ValueError(f"{protocol!r} cannot name a pruning protocol's folder")
        return self.stage_dir("prune", tag) / protocol

    def protocol_dirs(self, tag: str = "") -> list[Path]:
        """The protocol folders of a checkpoint found on disk (those holding :data:`PROTOCOL_FILE`), by name."""
        prune = self.stage_dir("prune", tag)
        return sorted(p.parent for p in prune.glob(f"*/{PROTOCOL_FILE}")) if prune.is_dir() else []

    def command(self, stage: str, *extra: str) -> str:
        """The command that makes this run's ``stage`` results (train, analyze, prune)."""
        return self.id.command(stage, *extra)
