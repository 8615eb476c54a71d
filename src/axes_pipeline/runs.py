"""How a result is written (atomically: a half-written file never looks finished), fingerprinted and
reused only when its fingerprint matches. Where a run's files are: :mod:`axes_pipeline.layout`."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axes_pipeline.errors import UserError


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
        with no_space_is_one_line(path):
            yield tmp_path
        # mkstemp creates 0600; an artifact should carry the usual permissions (0666 minus umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# What torch.save's zip writer says when a write fails (it hides the errno): "PytorchStreamWriter failed
# writing file data/0: file write failed", "enforce fail at inline_container.cc", "basic_ios::clear: iostream error".
_TORCH_WRITE_FAILED = ("inline_container.cc", "file write failed", "iostream error")
_NEARLY_FULL_BYTES = 64 << 20


def is_disk_full(err: BaseException, where: str | os.PathLike) -> bool:
    """True when ``err`` is a write that failed because the file system of ``where`` is full: ENOSPC
    (or EDQUOT, a quota), or torch's writer failing while that file system has under 64 MiB free
    (torch drops the errno, so the free space is what tells a full disk from another failure)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(err, RuntimeError) and any(m in str(err) for m in _TORCH_WRITE_FAILED):
        try:
            return shutil.disk_usage(Path(where)).free < _NEARLY_FULL_BYTES
        except OSError:
            return False
    return False


@contextmanager
def no_space_is_one_line(path: str | os.PathLike) -> Iterator[None]:
    """Turn a disk-full failure of the block (writing ``path``) into one line (:class:`UserError`, exit
    status 2) instead of torch's or pandas' traceback; other failures pass unchanged. The caller removes
    its temporary file (``atomic_path`` does)."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if is_disk_full(err, Path(path).parent):
            # around several writes (``path`` a folder) an OSError names the file it failed on
            where = (getattr(err, "filename", None) or path) if Path(path).is_dir() else path
            raise UserError(f"no space left on device writing {where}; free some space (or point "
                            f"paths.output_root elsewhere) and run the same command again") from None
        raise


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


_FILE_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """Content digest (16 hex) of a file, e.g. a checkpoint: a retrained or replaced checkpoint at
    the same path gets a new key, a copied one keeps its key. Memoised per (path, inode, size, mtime,
    ctime) so a stage that asks several times reads the file once: a file replaced by a rename (a new
    inode) or rewritten in place (a new ctime) is read again, even at the same size and mtime."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
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


def data_identity(data: Mapping[str, Any]) -> dict:
    """The keys of a data block (plain values) that decide which images, labels and splits a stage sees."""
    return {f"data.{k}": v for k, v in sorted(data.items()) if k not in DATA_KEYS_NOT_IDENTITY}


def run_fingerprint(data_id: Mapping[str, Any], ckpt: str | os.PathLike | None, **settings: Any) -> dict:
    """The identity of a result computed from checkpoint ``ckpt`` on the data ``data_id``
    (:func:`data_identity` of the data block): the data identity, the checkpoint's content digest and the
    stage's own ``settings`` (already plain values).

    Returns the dict (store it beside the result as JSON, so a mismatch can be shown key by key);
    ``fingerprint(run_fingerprint(...))`` is its short key for file names.
    """
    parts = {**data_id, **settings}
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


# ---- One "reuse this result if its fingerprint matches" rule -----------------------------------
# Every cached or resumable result (the axes table, its plots, lesion/dynamics/definitions parts, pruning
# points, the capture, the unpruned reference, a run's training settings) is written with the fingerprint
# of everything it depends on and read back only when that fingerprint is the one wanted now. A result is
# stored either beside its fingerprint (:class:`Stamp`, a JSON file next to a table or a folder of parts) or
# as a JSON record carrying it (:func:`write_record` / :func:`read_record`); both compare with
# :func:`mismatch`, which says why a result cannot be reused.


def plain(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples -> lists, numpy numbers -> numbers, Paths -> strings), so a
    fingerprint computed now compares equal to the same fingerprint read from disk."""
    return json.loads(json.dumps(obj, sort_keys=True, default=json_default))


def mismatch(have: Any, want: Any) -> str | None:
    """None when the stored fingerprint ``have`` is ``want``; otherwise why not, worded to follow "made
    with": ``other settings (lr: 0.1 -> 0.5)``, ``other inputs``, ``no recorded fingerprint``."""
    if have is None:
        return "no recorded fingerprint"
    if plain(have) == plain(want):
        return None
    if isinstance(have, Mapping) and isinstance(want, Mapping):
        return f"other settings ({settings_diff(plain(have), plain(want))})"
    return "other inputs"


@dataclass(frozen=True)
class Stamp:
    """The fingerprint file of a result (a table, a folder of parts, plots): :meth:`writing` surrounds the
    result's writes, :meth:`why_not` says whether the stored result may be reused."""

    path: Path
    want: Any

    def why_not(self) -> str | None:
        """None when the stored fingerprint is :attr:`want`; else why the result cannot be reused, worded
        to follow "made with" (:func:`mismatch`)."""
        try:
            have = read_json(self.path)
        except FileNotFoundError:
            return "no recorded fingerprint"
        except (OSError, ValueError):
            return f"an unreadable fingerprint ({self.path.name})"
        return mismatch(have, self.want)

    @property
    def current(self) -> bool:
        return self.why_not() is None

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Around the writes of the result: the old fingerprint is removed first and the new one written
        last, so results from an interrupted write never carry a fingerprint that matches."""
        self.path.unlink(missing_ok=True)
        yield
        write_json(self.path, self.want)


def write_record(path: str | os.PathLike, record: Mapping[str, Any], want: Any) -> Path:
    """Atomically write the JSON ``record`` carrying its fingerprint ``want`` (key ``fingerprint``)."""
    return write_json(path, {**record, "fingerprint": want})


def read_record(path: str | os.PathLike, want: Any) -> tuple[dict | None, str]:
    """``(record, "")`` when the JSON record at ``path`` carries fingerprint ``want``; else ``(None, why)``:
    ``why`` is "" when there is no file, else one line (unreadable, made with other settings)."""
    path = Path(path)
    if not path.is_file():
        return None, ""
    try:
        rec = read_json(path)
    except (OSError, ValueError) as err:
        return None, f"{path.name} cannot be read ({type(err).__name__})"
    if not isinstance(rec, dict):
        return None, f"{path.name} is not a record"
    why = mismatch(rec.get("fingerprint"), want)
    return (rec, "") if why is None else (None, f"{path.name} was made with {why}")


def check_writable(folder: str | os.PathLike, key: str = "paths.output_root") -> Path:
    """``folder`` (absolute) if this process can create files in it, or create it: else one line before
    any work (Hydra's logging traceback, or a stage failing on its last write after all its work).
    A folder not there yet is judged by its nearest existing parent."""
    folder = Path(folder).resolve()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{key}={folder} cannot be created: {probe} is a file, not a folder; "
                        f"choose another {key}")
    # os.access also says no on a read-only file system, for root too
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == folder else f"cannot be created ({probe} is not writable)"
        raise UserError(f"{key}={folder} {what} (read-only or another user's); choose another {key} "
                        f"(or set AXES_OUTPUT_ROOT)")
    return folder
