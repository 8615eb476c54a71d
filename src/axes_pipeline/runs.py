"""Where a run lives, and how its artifacts are written so a half-written file never looks finished."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.
    It keeps the final suffix (``.tmp-XXXX.csv``) for libraries that infer the format from it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; an artifact should carry the usual permissions (0666 minus umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write ``text`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_csv(path: str | os.PathLike, frame) -> Path:
    """Atomically write a pandas DataFrame as CSV without its index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def json_default(obj: Any) -> Any:
    """The ``default=`` of every ``json.dumps`` in the package: numpy / torch scalars and arrays as
    numbers and lists, anything else (a Path) as its string, so a summary, a fingerprint and the
    key it is compared with encode the same value the same way."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


#: The separator of :func:`flatten`'s keys: the dotted path a user types for a config key
#: (``capture.point``), so a flattened key reads the same in wandb, in the report's tables and on the
#: command line.
KEY_SEP = "."


def flatten(d: Mapping, skip: frozenset[str] | set[str] = frozenset(), prefix: str = "") -> dict:
    """``d`` with nested mappings flattened into dotted keys (``{"a": {"b": 1}}`` → ``{"a.b": 1}``).

    The package's one flattener: wandb's config and summary keys, the report's run settings and its
    summary quantities. A key in ``skip`` is left out at any depth; an empty mapping stays as a value
    (``{}``), so a key the config holds never silently disappears."""
    out = {}
    for k, v in d.items():
        if k in skip:
            continue
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, skip, key + KEY_SEP))
        else:
            out[key] = v
    return out


# Fingerprints: one helper keys every cache and resumable result on everything it depends on.

# Data settings that change *how* images are loaded but not *which* images or labels a stage sees.
# Every other key of cfg.data (name, image_size, split_seed, val_fraction, class_list, augment ...)
# is part of a result's identity, so a new data knob is keyed by default.
DATA_KEYS_NOT_IDENTITY = frozenset({"batch_size", "eval_batch_size", "num_workers", "data_dir", "download",
                                    "verify", "on_device", "recipe", "pin_memory", "persistent_workers"})


def fingerprint(parts: Mapping[str, Any]) -> str:
    """A short stable digest (16 hex) of ``parts`` (plain containers, numbers, strings, Paths); the
    JSON encoding is canonical, so the same settings give the same key on every machine."""
    blob = json.dumps(parts, sort_keys=True, default=json_default, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """Content digest (16 hex) of a file, e.g. a checkpoint: a retrained or replaced checkpoint at
    the same path gets a new key, a copied one keeps its key. Memoised per (path, size, mtime) so a
    stage that asks several times reads the file once."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _FILE_DIGESTS[key] = h.hexdigest()[:16]
    return _FILE_DIGESTS[key]


def frame_digest(frame) -> str:
    """Content digest (16 hex) of a pandas DataFrame's values (not its index), as :func:`file_digest`
    is of a file: e.g. the analysis table a pruning score reads, so a re-analysed table gets a new key."""
    import pandas as pd

    return fingerprint({"rows": pd.util.hash_pandas_object(frame, index=False).tolist()})


def data_identity(data_cfg: Mapping[str, Any]) -> dict:
    """The keys of a data config that decide which images, labels and splits a stage sees."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(data_cfg, DictConfig):
        data_cfg = OmegaConf.to_container(data_cfg, resolve=True)
    return {f"data.{k}": v for k, v in sorted(data_cfg.items()) if k not in DATA_KEYS_NOT_IDENTITY}


def run_fingerprint(cfg, ckpt: str | os.PathLike | None, **settings: Any) -> dict:
    """The identity of a result computed from checkpoint ``ckpt`` under ``cfg``: the data identity,
    the checkpoint's content digest and the stage's own ``settings`` (already plain values).

    Returns the dict (store it beside the result as JSON, so a mismatch can be shown key by key);
    ``fingerprint(run_fingerprint(...))`` is its short key for file names.
    """
    parts = {**data_identity(cfg.data), **settings}
    if ckpt is not None:
        parts["ckpt_digest"] = file_digest(ckpt)
    return parts


def settings_diff(have: Mapping[str, Any], want: Mapping[str, Any], limit: int = 4) -> str:
    """One line naming the keys whose values differ: ``lr: 0.1 -> 0.5, seed: (absent) -> 3``."""
    keys = sorted(set(have) | set(want), key=str)
    diffs = [f"{k}: {have.get(k, '(absent)')} -> {want.get(k, '(absent)')}"
             for k in keys if have.get(k, "(absent)") != want.get(k, "(absent)")]
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return ", ".join(diffs[:limit]) + more
