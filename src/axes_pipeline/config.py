"""Config helpers shared by every stage: the resolvers of the run folder, validation of common knobs.
(The typed schema of each stage's root is :mod:`axes_pipeline.schema`.)"""

from __future__ import annotations

import logging
import re

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from axes_pipeline.bounds import SEED_MAX
from axes_pipeline.errors import UserError
from axes_pipeline.layout import RunId

log = logging.getLogger("axes_pipeline")

# Characters a name may hold: it becomes one folder of the run directory, never a path of its own.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]*$")


def run_kind() -> str:
    """'multirun' inside a Hydra sweep job, else 'runs' (also when composed outside Hydra, e.g. tests)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return "multirun"
    except Exception:  # noqa: BLE001 - hydra absent or half-initialised: a single run
        pass
    return "runs"


def check_name(value, key: str = "name") -> str:
    """``value`` if it is safe as one folder name: a path separator or ``..`` would put the run (and
    a report) outside ``paths.output_root`` and could overwrite files there."""
    text = str(value)
    if not _SAFE_NAME.match(text) or ".." in text:
        raise UserError(f"{key}={text!r} is not a plain folder name (letters, digits, _ . + = -; "
                        f"no path separators, no '..'): every output must stay below paths.output_root")
    return text


if not OmegaConf.has_resolver("axes_mode"):
    OmegaConf.register_new_resolver("axes_mode", run_kind)
# ${axes_name:${name}} in the run and sweep directories: Hydra resolves it before it creates any
# folder, so an unsafe name stops before anything is written.
if not OmegaConf.has_resolver("axes_name"):
    OmegaConf.register_new_resolver("axes_name", check_name)
# ${axes_slug:${data.name},${model.name},${model.width},${seed}}: the run folder below the experiment's and
# Hydra's sweep subfolder, spelled by the one RunId.slug()
if not OmegaConf.has_resolver("axes_slug"):
    OmegaConf.register_new_resolver("axes_slug", lambda data, model, width, seed: RunId("", data, model, width, seed).slug())


def to_container(node: DictConfig) -> dict:
    """A resolved config node as plain Python containers (safe for JSON and weights_only checkpoints).
    A resolver's refusal (an unknown ``optim.name``) is raised as itself: one line, exit 2, not wrapped in
    OmegaConf's interpolation error."""
    try:
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
    except InterpolationResolutionError as err:
        cause = err   # OmegaConf wraps the resolver's error in its own, once per nesting level
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise UserError(str(cause)) from None
        raise


def check_seed(value) -> int:
    """The seed as an int; a UserError for anything else (``seed=abc``) and for a seed numpy refuses
    (``seed=-1``: a numpy traceback once a ``seed-1/`` folder was made)."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value), 10)
        except ValueError:
            raise UserError(f"seed must be an integer, got {value!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise UserError(f"seed={value} is out of range: it must be in [0, {SEED_MAX}] (numpy's seed range)")
    return int(value)


def check_positive(value, key: str) -> None:
    if value is None or value <= 0:
        raise UserError(f"{key} must be positive, got {value}")


def load_plugins(modules) -> None:
    """Import the ``plugins`` modules (their decorators register scores and analyses); a module
    that cannot be imported is one UserError line naming it."""
    import importlib

    for name in modules or []:
        try:
            importlib.import_module(str(name))
        except Exception as err:  # noqa: BLE001 - any failure of a user's module is one line
            raise UserError(f"plugins: cannot import {name!r} ({type(err).__name__}: {err}); "
                            f"is it on PYTHONPATH?") from None
