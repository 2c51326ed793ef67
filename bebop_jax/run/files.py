"""Run directories and atomic JSON files.

- `ensure_run_dir(path)`: create the run directory, or fail at once with one clear error.
- `write_results_json(run_dir, obj)` / `write_json_atomic(path, obj)`: atomic writes (temp
  file in the same directory, fsync, os.replace), so a reader never sees a half-written file.
- `cached_json(path, compute)`: a JSON result computed once and kept for a rerun.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np


def ensure_run_dir(path: str | os.PathLike) -> Path:
    """Creates `path` (and parents) and checks a file can be written in it.

    Raises one ValueError naming the path and the reason (a parent is a file, the path
    is a file, no permission, read-only filesystem) before any work is done.
    """
    run_dir = Path(path)
    existing = run_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "it" if existing == run_dir.absolute() else str(existing)
        raise ValueError(
            f"run_dir {str(run_dir)!r} is not a writable directory ({where} is a file)"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".write_probe_")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        if e.filename and os.fspath(e.filename) != os.fspath(run_dir):
            reason += f": {e.filename}"
        raise ValueError(
            f"run_dir {str(run_dir)!r} is not a writable directory ({reason})"
        ) from None
    return run_dir


def _json_default(obj: Any) -> Any:
    """Converts numpy/jax values, dataclasses, paths and enums for json.dumps."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, jax.Array)):
        return np.asarray(obj).tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable: {obj!r:.80}")


def to_json(obj: Any, *, indent: int | None = 2) -> str:
    """json.dumps that also accepts numpy/jax scalars and arrays, dataclasses, paths, enums.

    Non-finite floats are written as NaN / Infinity (Python's json reads them back).
    """
    return json.dumps(obj, indent=indent, default=_json_default)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Writes `obj` as JSON to `path` atomically (its directory is created); returns the path.

    The whole text is serialised first (a bad value raises before the disk is touched),
    then written to a temp file in the same directory, fsynced and renamed over the
    target: readers see the old file or the new one, never a partial one.
    """
    return _write_text_atomic(path, to_json(obj, indent=indent) + "\n")


def _write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    target = Path(path)
    if not target.name or target.name in (".", ".."):
        raise ValueError(f"path must name a file, got {str(path)!r}")
    directory = ensure_run_dir(target.parent)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return target


def write_results_json(run_dir: str | os.PathLike, obj: Any, name: str = "results.json") -> Path:
    """Writes `obj` as JSON to run_dir/name atomically (see `write_json_atomic`); returns the path."""
    if not name or os.sep in name:
        raise ValueError(f"name must be a plain file name, got {name!r}")
    return write_json_atomic(Path(run_dir) / name, obj)


def cached_json(path: str | os.PathLike, compute: Callable[[], Any]) -> Any:
    """The JSON at `path`, or `compute()` written there atomically first: a stage of a run
    that a rerun after a crash does not repeat."""
    path = Path(path)
    if path.is_file():
        return json.loads(path.read_text())
    text = to_json(compute(), indent=None)  # serialised once: written, and read back as a rerun would
    _write_text_atomic(path, text + "\n")
    return json.loads(text)
