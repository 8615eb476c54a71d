"""The task wrapper every entry point goes through, and ``hydra_entry``, the ``hydra.main`` in front
of it that turns a command-line mistake into one line and exit status 2 before Hydra runs.

It seeds, says where the run lives, turns a user mistake into one line and exit status 2, and
always closes the experiment tracker so the next job of a multirun starts clean. Inside a sweep
a failing job leaves a `<stage>.failed` marker and the sweep goes on; `SweepSummary` names the
failed jobs at the end.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import sys
import traceback
from pathlib import Path
from typing import Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from axes_pipeline.config import _mode, check_name, check_seed, run_dir
from axes_pipeline.errors import UserError, unknown_name

log = logging.getLogger("axes_pipeline")


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
        if key == "name":
            for v in _values(value):
                check_name(v)
        elif key == "seed":
            for v in _values(value):
                check_seed(v)
        elif key in groups:
            options = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
            for v in _values(value):
                if v == "null" and key in _OPTIONAL_GROUPS:
                    continue
                if v not in options:
                    raise unknown_name(f"{key} (conf/{key}/)", v, options)


_MULTIRUN_FLAGS = {"-m", "--multirun"}


def check_composes(conf_dir: Path, config_name: str, args: list[str]) -> None:
    """Compose the config once before Hydra does, so that any other override Hydra would reject
    (``trainer.nosuch=1``, ``optim.lr=abc``, a malformed value) is one line too. A sweep (``-m``)
    is composed once per value of each swept key (:func:`sweep_variants`), so a bad value in it
    stops before the first job rather than failing that job. Hydra's other flags (``--cfg``,
    ``--info``...) are left to Hydra."""
    if any(a.startswith("-") and a not in _MULTIRUN_FLAGS for a in args):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [a for a in args if a not in _MULTIRUN_FLAGS]
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            for variant in sweep_variants(overrides):
                compose(config_name=config_name, overrides=variant, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        lines = [ln.strip().rstrip(".") for ln in str(err).splitlines() if ln.strip()]
        raise UserError("; ".join(lines) or type(err).__name__) from None


def sweep_variants(overrides: list[str]) -> list[list[str]]:
    """Single-run override lists covering every value of every swept key once (``seed=1,2
    optim.lr=0.1,abc`` -> 3 lists, not the 4 jobs): the other swept keys take their first value.
    A sweep Hydra cannot list up front (an optimizer's ``interval(0.01, 0.1)``, a ``glob``) is
    checked at one value, or left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return [overrides]   # malformed: composing it gives Hydra's own message
    choices = []
    for arg, override in zip(overrides, parsed):
        if not override.is_sweep_override():
            choices.append([arg])
            continue
        key = override.get_key_element()
        try:
            values = list(override.sweep_string_iterator())
        except Exception:  # noqa: BLE001 - interval(): one value of it; glob(): Hydra expands it later
            start = getattr(override.value(), "start", None)
            values = [] if start is None else [str(start)]
        choices.append([f"{key}={v}" for v in values])
    choices = [c for c in choices if c]
    firsts = [c[0] for c in choices]
    variants = [firsts]
    for i, values in enumerate(choices):
        variants += [firsts[:i] + [v] + firsts[i + 1:] for v in values[1:]]
    return variants


def hydra_entry(config_name: str, config_path: str = "conf"):
    """``hydra.main`` for an entry point, with :func:`check_command_line` in front of it: a user
    mistake on the command line is one ``error:`` line and exit status 2, as everywhere else."""

    def decorate(fn):
        conf_dir = Path(inspect.getfile(fn)).resolve().parent / config_path
        import hydra

        task = hydra.main(version_base="1.3", config_path=config_path, config_name=config_name)(fn)

        @functools.wraps(fn)
        def main():
            try:
                check_command_line(conf_dir, sys.argv[1:])
                check_composes(conf_dir, config_name, sys.argv[1:])
            except UserError as err:
                print(f"error: {err}", file=sys.stderr)
                sys.exit(2)
            return task()

        return main

    return decorate


def run_task(fn: Callable[[DictConfig], object], cfg: DictConfig,
             where: Callable[[DictConfig], Path] = run_dir):
    """Run one stage function ``fn(cfg)`` with seeding, error handling and tracker cleanup.

    ``where(cfg)`` is the directory the stage works in (a run's directory, or for the report the
    sweep's); a failure marker goes there inside a sweep.
    """
    import lightning as L

    stage = cfg.get("stage", "task")
    in_sweep = _mode() == "multirun"
    _single_log_stream()
    _share_cores()
    marker = None
    try:
        check_name(cfg.name)
        seed = check_seed(cfg.seed)
        out = where(cfg)
        marker = out / f"{stage}.failed"
        L.seed_everything(seed, workers=True, verbose=False)
        log.info("%s: working in %s", stage, out)
        result = fn(cfg)
        if marker.exists():
            marker.unlink()
        return result
    except UserError as err:
        _mark(marker, f"error: {err}\n")
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
    # Lightning adds its own console handler; under Hydra the root logger already prints (and
    # writes <stage>.log), so every Lightning line would appear twice. Let them propagate once.
    if logging.getLogger().handlers:
        for name in ("lightning.pytorch", "lightning.fabric"):
            lg = logging.getLogger(name)
            for h in list(lg.handlers):
                lg.removeHandler(h)
            lg.propagate = True
    # Lightning announces its default at every checkpoint save; once per epoch and file is noise.
    logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector").setLevel(logging.WARNING)


def _mark(marker: Path | None, text: str) -> None:
    if marker is None:
        return
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(text)
    except OSError:
        pass


def _finish_tracker() -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except Exception:  # noqa: BLE001 - closing the tracker must never mask the real outcome
        pass


class SweepSummary(Callback):
    """Around a multirun: refuse a SLURM launcher where there is no `sbatch`; at the end name the
    jobs that failed (from their markers) and exit non-zero."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        import shutil

        target = str(config.hydra.launcher.get("_target_", ""))
        if target.endswith("SlurmLauncher") and shutil.which("sbatch") is None:
            print("error: the SLURM launcher (hydra/launcher=slurm or submitit_slurm) needs SLURM's `sbatch`, "
                  "which is not on this machine's PATH; run on the cluster's login node, or use "
                  "hydra/launcher=parallel here",
                  file=sys.stderr)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        stage = config.get("stage", "task")
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = sorted(sweep_dir.rglob(f"{stage}.failed"))
        if failed:
            print(f"\n{len(failed)} {stage} job(s) failed:", file=sys.stderr)
            for path in failed:
                first = path.read_text().strip().splitlines()[-1:] or [""]
                print(f"  {path.parent}: {first[0]}", file=sys.stderr)
            sys.exit(1)
        print(f"{stage} sweep finished: results under {sweep_dir}")
