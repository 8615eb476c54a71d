"""The task wrapper every entry point goes through (:func:`run_task`), and :func:`hydra_entry`, the
``hydra.main`` in front of it.

A user mistake, on the command line or later, is one line and exit status 2. The tracker is always
closed so the next job of a multirun starts clean. Inside a sweep a failing job leaves a
`<stage>.failed` marker (a crash: its traceback) and the sweep goes on; every job of a sweep records how it
ended (`<sweep>/.jobs/<stage>/`) and `SweepSummary` names this sweep's failed jobs at the end. A refusal leaves no
marker, and no folder where Hydra made one only for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from axes_pipeline.bounds import check_bounds
from axes_pipeline.config import check_name, check_seed, load_plugins, run_kind
from axes_pipeline.errors import UserError, unknown_name
from axes_pipeline.runs import check_writable, read_json, write_json
from axes_pipeline.stage import stage_inputs

log = logging.getLogger("axes_pipeline")
# torch.utils.cpp_extension warns "No CUDA runtime is found, using CUDA_HOME=..." when it is imported
# (torch.compile's machinery imports it) on a machine with a CUDA toolkit but no GPU: on a CPU run that is
# expected, not news. Set here, when an entry point imports the task wrapper, before any stage can import it.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


# Config groups whose options are files in conf/<group>/; `null` switches an optional one off.
_OPTIONAL_GROUPS = {"experiment", "debug"}
_SWEEP_SYNTAX = re.compile(r"[()${}*]")     # range(), choice(), glob(*), interpolations: Hydra's own


def _values(value: str) -> list[str]:
    """The choices of one command-line value: ``a``, a sweep ``a,b`` or a list ``[a,b]``."""
    value = value.strip().strip("'\"")
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    return [v.strip().strip("'\"") for v in value.split(",") if v.strip()]


def check_command_line(conf_dir: Path, args: list[str]) -> None:
    """Refuse, in one line, the overrides Hydra would reject with several lines and status 1 (an
    unknown ``model=``/``data=``/... choice) or that would fail later with a traceback (``seed=abc``,
    a ``name`` that leaves the output root). Runs before Hydra creates any folder."""
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir() and p.name != "hydra"}
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if _SWEEP_SYNTAX.search(value):
            continue
        if key in ("name", "seed"):
            for v in _values(value):
                (check_name if key == "name" else check_seed)(v)
        elif key in groups:
            options = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
            for v in _values(value):
                if v == "null" and key in _OPTIONAL_GROUPS:
                    continue
                if v not in options:
                    raise unknown_name(f"{key} (conf/{key}/)", v, options)


def _sweep_jobs(args: list[str], most: int = 32) -> list[list[str]] | None:
    """Jobs of a sweep that together hold each choice once: the first job, then one per other value
    of a choice sweep (a range holds one type: its first value stands for it). None when the sweep
    cannot be enumerated here (``glob(...)``, an interval: the sweeper's own business)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except HydraException:
        return [list(args)]            # malformed: composing it gives Hydra's own message
    values: list[list[str]] = []
    for o in parsed:
        if not o.is_sweep_override():
            values.append([o.input_line])
        elif o.is_discrete_sweep() and o.value_type.name != "GLOB_CHOICE_SWEEP":
            choices = list(o.sweep_string_iterator()) if o.is_choice_sweep() else [next(o.sweep_string_iterator())]
            values.append([f"{o.get_key_element()}={v}" for v in choices])
        else:
            return None
    first = [v[0] for v in values]
    jobs = [first] + [[*first[:i], v, *first[i + 1:]] for i, vs in enumerate(values) for v in vs[1:]]
    return jobs[:most]


def _added_to_schema(cfg, args: list[str], conf_dir: Path) -> str | None:
    """The first ``+key=value`` whose parent is a typed config (Hydra's ``+`` adds a key even there),
    with the schema's name; None when every addition lands in an open node (``+model.net.depth=3``)
    or adds a config group's option (``+experiment=demo``)."""
    import dataclasses

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    for o in OverridesParser.create().parse_overrides(args):
        if not o.is_add() or o.is_hydra_override() or (conf_dir / o.key_or_group).is_dir():
            continue
        parent = o.key_or_group.rpartition(".")[0]
        node = OmegaConf.select(cfg, parent) if parent else cfg
        schema = OmegaConf.get_type(node) if OmegaConf.is_dict(node) else None
        field = o.key_or_group.rpartition(".")[2]
        # a field the schema declares (left null, e.g. trainer.limit_train_batches) takes `+` as Hydra does
        if schema is not None and dataclasses.is_dataclass(schema) and field not in {f.name for f in dataclasses.fields(schema)}:
            return (f"+{o.key_or_group}: {parent or 'the config'} is typed ({schema.__module__}.{schema.__name__}) "
                    f"and takes no new keys; check the name")
    return None


def check_composes(conf_dir: Path, config_name: str, args: list[str]) -> None:
    """Compose the run's config (with ``-m``: the jobs of :func:`_sweep_jobs`) once before Hydra does,
    so that any other override Hydra would reject (``trainer.nosuch=1``, a ``+key`` a schema lacks)
    is one line too. Hydra's other flags are left to Hydra."""
    flags = [a for a in args if a.startswith("-")]
    if any(f not in ("-m", "--multirun") for f in flags):
        return
    overrides = [a for a in args if not a.startswith("-")]
    jobs = _sweep_jobs(overrides) if flags else [overrides]
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        for job in jobs or []:
            try:
                cfg = compose(config_name=config_name, overrides=job, return_hydra_config=True)
            except (HydraException, OmegaConfBaseException) as err:
                raise UserError(_one_line(err)) from None
            added = _added_to_schema(cfg, job, conf_dir)
            if added:
                raise UserError(added)
            check_before_work(cfg)


def check_before_work(cfg: DictConfig) -> None:
    """What the composed config must satisfy before anything is written: every bounded knob in its
    schema's range, and an output root (and report.out) this process can write to."""
    check_bounds(cfg)
    check_writable(cfg.paths.output_root)
    out = OmegaConf.select(cfg, "report.out")
    if out:
        check_writable(out, "report.out")


def _one_line(err: Exception) -> str:
    """Hydra's message with the first line of its cause, which names the value or key at fault
    (``Value 'abc' ... could not be converted to Integer``, ``Key 'nosuch' not in 'DigitsData'``).
    Hydra's hint to append with ``+`` is dropped where the node is typed: it would be refused."""
    lines = [ln.strip().rstrip(".") for ln in str(err).splitlines() if ln.strip()]
    cause = str(err.__cause__ or "").strip()
    if cause and lines and lines[0].startswith(("Error merging override", "Could not override")):
        reason = cause.splitlines()[0].rstrip(".")
        if "is not in struct" not in reason:          # a schema's key list, not an open node
            lines = [ln for ln in lines if not ln.startswith("To append to your config")]
        lines.insert(1, reason)
    return "; ".join(lines) or type(err).__name__


def hydra_entry(config_name: str, config_path: str = "conf"):
    """``hydra.main`` for an entry point, with :func:`check_command_line` and :func:`check_composes`
    in front of it: a command-line mistake is one ``error:`` line and exit status 2."""

    def decorate(fn):
        conf_dir = Path(inspect.getfile(fn)).resolve().parent / config_path
        import hydra

        task = hydra.main(version_base="1.3", config_path=config_path, config_name=config_name)(fn)

        @functools.wraps(fn)
        def main():
            try:
                check_command_line(conf_dir, sys.argv[1:])
                # deferred: the schemas' rooms import torch and Lightning (seconds); a command-line mistake
                # is refused before any of them loads
                from axes_pipeline.schema import register

                register()   # the explicit setup call: every typed config group, before the first composition
                check_composes(conf_dir, config_name, sys.argv[1:])
            except UserError as err:
                print(f"error: {err}", file=sys.stderr)
                sys.exit(2)
            return task()

        return main

    return decorate


def refuse_several_processes(stage: str) -> None:
    """Stop when started as one of several processes (torchrun, srun -n, a DDP launcher).

    Capture, analysis and pruning run in one process on one device: under N processes every
    rank would capture, prune and write the same files N times over (and the moments of one
    rank's shard are not the calibration set's). They refuse rather than run on rank 0 only,
    so the other ranks do not sit idle holding a device."""
    import torch  # deferred: a command-line mistake is refused before torch loads (hydra_entry)

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = max(world, torch.distributed.get_world_size())
    if world > 1:
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "?"))
        raise UserError(f"{stage} runs in one process on one device, but this is rank {rank} of {world} "
                        f"(WORLD_SIZE={world}); start it with plain python, not torchrun or a DDP launcher "
                        f"(only train.py uses trainer=ddp)")


def trained_dir(cfg: DictConfig) -> Path:
    """The folder of the trained run a later stage (analyze, prune) works on, as its stage will find it:
    the folder holding ``ckpt=`` (or its ``external/`` folder), else the first candidate that holds a run."""
    run = stage_inputs(cfg).run
    return (run.for_checkpoint(Path(str(cfg.ckpt))) if cfg.ckpt else run.found()).dir


def run_task(fn: Callable[[DictConfig], object], cfg: DictConfig,
             where: Callable[[DictConfig], Path] | None = None, one_process: bool = False):
    """Run one stage function ``fn(cfg)`` with seeding, error handling and tracker cleanup.
    ``where(cfg)`` is the directory the stage works in (a failure marker goes there in a sweep); default:
    the run's own folder. ``one_process``: refuse to run as one of several processes (analyze, prune:
    :func:`refuse_several_processes`)."""
    import lightning as L

    stage = cfg.stage
    in_sweep = run_kind() == "multirun"
    _single_log_stream()
    _share_cores()
    marker = None
    job = _hydra_job()
    try:
        check_name(cfg.name)
        seed = check_seed(cfg.seed)
        check_before_work(cfg)     # again: a stage called from Python (tests, notebooks) skips hydra_entry
        if one_process:
            refuse_several_processes(f"{stage}.py")
        load_plugins(cfg.plugins)
        out = where(cfg) if where is not None else stage_inputs(cfg).run.dir
        marker = out / f"{stage}.failed"
        L.seed_everything(seed, workers=True, verbose=False)
        log.info("%s: working in %s", stage, out)
        result = fn(cfg)
        if marker.exists():
            marker.unlink()
        _record_job(job, stage, out, None)
        return result
    except UserError as err:
        # a refusal (one line, said on the console or in the sweep's summary) leaves nothing behind: no marker,
        # and the job folder Hydra made for it goes when it holds only Hydra's files
        if job is not None:
            _drop_hydra_only(job.folder, stage, Path(str(cfg.paths.output_root)))
        _record_job(job, stage, marker.parent if marker is not None else job and job.folder, f"error: {err}")
        if in_sweep:
            log.error("error: %s", err)
            return None
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        raise
    except Exception:
        if not in_sweep:
            raise
        # A failed job must not lose the other jobs' results: record it and go on.
        _mark(marker, traceback.format_exc())
        _record_job(job, stage, marker.parent if marker is not None else job and job.folder,
                    traceback.format_exc().strip().splitlines()[-1])
        log.exception("%s failed", stage)
        return None
    finally:
        _finish_tracker()


def _share_cores() -> None:
    # Under the joblib launcher n_jobs processes run at once; torch's default of one thread per core
    # in each would oversubscribe the machine, so every job takes its share of the cores.
    try:
        from hydra.core.hydra_config import HydraConfig

        launcher = HydraConfig.get().launcher
    except Exception:  # noqa: BLE001 - not under Hydra (tests, notebooks): leave torch's default
        return
    if not str(launcher.get("_target_", "")).endswith("JoblibLauncher"):
        return
    import os

    import torch

    cores = os.cpu_count() or 1
    n_jobs = int(launcher.get("n_jobs") or 1)
    n_jobs = cores + 1 + n_jobs if n_jobs < 0 else n_jobs      # joblib: -1 = all cores
    torch.set_num_threads(max(1, cores // max(1, min(n_jobs, cores))))


def _single_log_stream() -> None:
    # Lightning adds its own console handler (on "lightning" itself since lightning 2.x's umbrella
    # package, on its subpackages before); under Hydra the root logger already prints (and writes
    # <stage>.log), so every Lightning line would appear twice. Let them propagate once.
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            lg = logging.getLogger(name)
            for h in list(lg.handlers):
                lg.removeHandler(h)
            lg.propagate = True
    # Lightning announces its default at every checkpoint save; once per epoch and file is noise.
    logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector").setLevel(logging.WARNING)


def _mark(marker: Path | None, text: str) -> None:
    """The marker of a job that crashed in a sweep (its traceback), beside the results it could not finish."""
    if marker is None:
        return
    with contextlib.suppress(OSError):
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(text)


@dataclasses.dataclass(frozen=True)
class HydraJob:
    """The Hydra job this process runs: its output folder, and in a sweep the sweep folder and job number."""

    folder: Path
    sweep: Path | None = None
    num: int = 0


def _hydra_job() -> HydraJob | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except Exception:  # noqa: BLE001 - not under Hydra (tests, notebooks): nothing Hydra made to tidy
        return None
    sweep = Path(hc.sweep.dir).resolve() if run_kind() == "multirun" else None
    return HydraJob(Path(hc.runtime.output_dir).resolve(), sweep, int(hc.job.get("num") or 0))


def _drop_hydra_only(folder: Path, stage: str, root: Path) -> None:
    """Remove ``folder`` (and its parents that are left empty, up to the output ``root``) when it holds nothing
    but what Hydra wrote for this job (``.hydra/<stage>/``, ``<stage>.log``) and an old marker: a folder made
    only for a refused command. A folder holding anything else (a run's results) is left as it is."""
    root = root.resolve()
    if not folder.is_dir() or root not in folder.parents or _logged_before(folder / f"{stage}.log"):
        return
    own = {".hydra", f"{stage}.log", f"{stage}.failed"}
    hydra = folder / ".hydra"
    if any(p.name not in own for p in folder.iterdir()) or (hydra.is_dir() and any(p.name != stage for p in hydra.iterdir())):
        return
    with contextlib.suppress(OSError):
        shutil.rmtree(folder)
        parent = folder.parent
        while parent != root and root in parent.parents and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


_STARTED = time.time()   # this process' start (the entry point imports this module first), for _logged_before
_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")


def _logged_before(log_file: Path) -> bool:
    """True when ``log_file`` (Hydra's ``<stage>.log``, appended to by every run) starts with a line written
    before this process started, or cannot be read: an earlier command's folder, never removed by a refusal."""
    try:
        with open(log_file, errors="replace") as f:
            first = f.readline()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    if not first:
        return False
    m = _LOG_TIME.match(first)
    if m is None:
        return True
    try:
        return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) < int(_STARTED) - 1
    except (ValueError, OverflowError):
        return True


#: where the jobs of a sweep record how they ended (``<sweep>/.jobs/<stage>/<num>.json``), read by SweepSummary
JOBS_DIR = ".jobs"


def _jobs_dir(sweep: Path, stage: str) -> Path:
    return Path(sweep) / JOBS_DIR / stage


def _record_job(job: HydraJob | None, stage: str, folder: Path | None, error: str | None) -> None:
    """In a sweep: how this job ended (``error`` None: finished), for this sweep's summary only."""
    if job is None or job.sweep is None:
        return
    with contextlib.suppress(OSError):
        write_json(_jobs_dir(job.sweep, stage) / f"{job.num:05d}.json",
                   {"folder": str(folder or job.folder), "ok": error is None, "error": error})


def _finish_tracker() -> None:
    with contextlib.suppress(Exception):   # closing the tracker must never mask the real outcome
        import wandb

        if wandb.run is not None:
            wandb.finish()


class SweepSummary(Callback):
    """Around a multirun: refuse a SLURM launcher where there is no `sbatch`; at the end name the
    jobs that failed (from their markers) and exit non-zero."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        # this sweep's jobs record how they ended here; records of an earlier sweep never count in this one
        shutil.rmtree(_jobs_dir(Path(config.hydra.sweep.dir), config.stage), ignore_errors=True)
        target = str(config.hydra.launcher.get("_target_", ""))
        if target.endswith("SlurmLauncher") and shutil.which("sbatch") is None:
            print("error: the SLURM launcher (hydra/launcher=slurm or submitit_slurm) needs SLURM's `sbatch`, "
                  "which is not on this machine's PATH; run on the cluster's login node, or use "
                  "hydra/launcher=parallel here",
                  file=sys.stderr)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        stage = config.stage
        sweep_dir = Path(config.hydra.sweep.dir)
        records = []
        for path in sorted(_jobs_dir(sweep_dir, stage).glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                records.append(read_json(path))
        shutil.rmtree(_jobs_dir(sweep_dir, stage), ignore_errors=True)
        with contextlib.suppress(OSError):   # the records' folder, once no stage's sweep is using it
            (sweep_dir / JOBS_DIR).rmdir()
        failed = [r for r in records if not r.get("ok")]
        if failed:
            print(f"\n{len(failed)} {stage} job(s) failed (of {len(records)} in this sweep):", file=sys.stderr)
            for r in failed:
                print(f"  {r.get('folder')}: {(str(r.get('error') or '').splitlines() or [''])[-1]}", file=sys.stderr)
            sys.exit(1)
        print(f"{stage} sweep finished: {len(records)} job(s), results under {sweep_dir}")
