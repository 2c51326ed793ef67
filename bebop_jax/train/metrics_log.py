"""Run directories, metric logging, progress bars, summary tables and results.json.

Named metrics_log (not logging) so `from bebop_jax.train import metrics_log` never
shadows the standard library's `logging` in a caller's namespace.

- `ensure_run_dir(path)`: create the run directory, or fail at once with one clear error.
- `MetricLogger(run_dir)`: every scalar to TensorBoard (tensorboardX event files under
  run_dir/tensorboard) and to run_dir/metrics.jsonl (one line per `log` call,
  {"step", "wall_time", "scalars": {name: value}}, to read back without TensorBoard).
- `Progress` / `progress(...)`: tqdm on a terminal; on a pipe or file, a plain line with
  count, rate, elapsed time and ETA every `interval_s` seconds (no carriage returns).
- `print_table(rows, columns, title)`: aligned plain-text summary tables.
- `write_results_json(run_dir, obj)`: atomic write (temp file in the same directory,
  fsync, os.replace), so a reader never sees a half-written results.json.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np

# ----------------------------------------------------------------------------- run dir


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


# ----------------------------------------------------------------------------- JSON


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


def write_results_json(run_dir: str | os.PathLike, obj: Any, name: str = "results.json") -> Path:
    """Writes `obj` as JSON to run_dir/name atomically; returns the file's path.

    The whole text is serialised first (a bad value raises before the disk is touched),
    then written to a temp file in the same directory, fsynced and renamed over the
    target: readers see the old file or the new one, never a partial one.
    """
    if not name or os.sep in name:
        raise ValueError(f"name must be a plain file name, got {name!r}")
    text = to_json(obj) + "\n"
    directory = ensure_run_dir(run_dir)
    target = directory / name
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
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


# ----------------------------------------------------------------------------- metrics


class MetricLogger:
    """Logs scalars to TensorBoard (run_dir/tensorboard) and run_dir/metrics.jsonl.

    `enabled` defaults to "this is JAX process 0", so every host may call `log` and
    only one writes. Values may be jax arrays: one `jax.device_get` per `log` call.
    To avoid stalling the device, log step N's metrics after dispatching step N+1.
    """

    def __init__(
        self, run_dir: str | os.PathLike, *, enabled: bool | None = None, flush_secs: int = 30
    ):
        self.run_dir = Path(run_dir)
        self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
        self._writer = None
        self._jsonl: IO[str] | None = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            ensure_run_dir(self.run_dir)
            self._writer = SummaryWriter(
                logdir=str(self.run_dir / "tensorboard"), flush_secs=flush_secs
            )
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a")

    def log(self, step: int, scalars: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
        """Logs each scalar as `prefix/name` at `step`; returns the logged floats.

        Every value must hold exactly one number (python, numpy or jax; shape () or a
        single element). Bad input raises ValueError naming the key before anything is
        written.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if not isinstance(scalars, Mapping):
            raise ValueError(f"scalars must be a mapping of name -> scalar, got {type(scalars)}")
        host = jax.device_get(dict(scalars))
        values: dict[str, float] = {}
        for key, value in host.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"scalars: keys must be non-empty strings, got {key!r}")
            arr = np.asarray(value)
            real = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
            if arr.size != 1 or not (real or arr.dtype == bool):
                raise ValueError(
                    f"scalars[{key!r}] must be a single number, got {arr.dtype}{list(arr.shape)}"
                )
            name = f"{prefix.rstrip('/')}/{key}" if prefix else key
            values[name] = float(arr.reshape(()))
        if self.enabled:
            for name, value in values.items():
                self._writer.add_scalar(name, value, int(step))
            record = {"step": int(step), "wall_time": time.time(), "scalars": values}
            self._jsonl.write(json.dumps(record) + "\n")
        return values

    def flush(self) -> None:
        if self.enabled:
            self._writer.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled and self._jsonl is not None:
            self._writer.close()
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------- progress


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _isatty(file: Any) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """Progress with rate and ETA for long loops.

    mode: "auto" (a tqdm bar if `file` is a terminal, else plain lines), "bar", "plain"
    or "off". Plain mode prints a line at the first update, then at most every
    `interval_s` seconds, and a last line on close: no carriage returns, so log files
    and CI output stay readable.
    """

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        *,
        file: IO[str] | None = None,
        mode: str = "auto",
        interval_s: float = 30.0,
        unit: str = "it",
        clock: Callable[[], float] = time.monotonic,
    ):
        if mode not in ("auto", "bar", "plain", "off"):
            raise ValueError(f"mode must be auto, bar, plain or off, got {mode!r}")
        if total is not None and total < 0:
            raise ValueError(f"total must be >= 0 or None, got {total!r}")
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s!r}")
        self.file = sys.stderr if file is None else file
        if mode == "auto":
            mode = "bar" if _isatty(self.file) else "plain"
        self.mode, self.total, self.desc, self.unit = mode, total, desc, unit
        self.n = 0
        self._interval_s, self._clock = interval_s, clock
        self._start = clock()
        self._last_print: float | None = None
        self._postfix: dict[str, Any] = {}
        self._closed = False
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=self.file, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advances by `n`; keyword arguments are shown after the counts (e.g. loss=...)."""
        self.n += n
        if postfix:
            self._postfix.update(postfix)
        if self.mode == "bar":
            if postfix:
                self._bar.set_postfix(self._formatted_postfix(), refresh=False)
            self._bar.update(n)
        elif self.mode == "plain":
            now = self._clock()
            if self._last_print is None or now - self._last_print >= self._interval_s:
                self._print_line(now)

    def _formatted_postfix(self) -> dict[str, str]:
        return {
            k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in self._postfix.items()
        }

    def line(self, now: float | None = None) -> str:
        """The plain-text status: 'desc: n/total (p%) | r it/s | elapsed t | ETA t | k=v'."""
        now = self._clock() if now is None else now
        elapsed = max(now - self._start, 0.0)
        rate = self.n / elapsed if elapsed > 0 else float("nan")
        parts = []
        if self.total:
            parts.append(f"{self.n}/{self.total} ({100.0 * self.n / self.total:.0f}%)")
        else:
            parts.append(f"{self.n}")
        parts.append(f"{rate:.3g} {self.unit}/s" if math.isfinite(rate) else f"? {self.unit}/s")
        parts.append(f"elapsed {_hms(elapsed)}")
        if self.total:
            remaining = (self.total - self.n) / rate if rate > 0 else float("nan")
            parts.append(f"ETA {_hms(max(remaining, 0.0))}")
        parts += [f"{k}={v}" for k, v in self._formatted_postfix().items()]
        head = f"{self.desc}: " if self.desc else ""
        return head + " | ".join(parts)

    def _print_line(self, now: float) -> None:
        self._last_print = now
        print(self.line(now), file=self.file, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.mode == "bar":
            self._bar.close()
        elif self.mode == "plain":
            self._print_line(self._clock())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(
    iterable: Iterable[Any], total: int | None = None, desc: str = "", **kwargs: Any
) -> Iterator[Any]:
    """Yields from `iterable` while showing a `Progress` (total from len() if it has one)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(total, desc, **kwargs) as bar:
        for item in iterable:
            yield item
            bar.update(1)


# ----------------------------------------------------------------------------- tables


def _cell(value: Any, float_format: str) -> tuple[str, bool]:
    """(text, is_number): numbers are right-aligned, everything else left-aligned."""
    if value is None:
        return "-", False
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)), False
    if isinstance(value, (float, np.floating)):
        return float_format.format(float(value)), True
    if isinstance(value, (int, np.integer)):
        return str(int(value)), True
    return str(value), False


def format_table(
    rows: Sequence[Mapping[str, Any] | Sequence[Any]],
    columns: Sequence[str],
    title: str | None = None,
    *,
    float_format: str = "{:.4g}",
) -> str:
    """Aligned plain-text table. Rows are mappings (by column name; missing -> '-') or
    sequences (by position, one value per column)."""
    if not columns:
        raise ValueError("columns must name at least one column")
    cells: list[list[tuple[str, bool]]] = []
    for i, row in enumerate(rows):
        if isinstance(row, Mapping):
            values = [row.get(c) for c in columns]
        else:
            values = list(row)
            if len(values) != len(columns):
                raise ValueError(
                    f"rows[{i}] has {len(values)} values for {len(columns)} columns"
                )
        cells.append([_cell(v, float_format) for v in values])
    widths = [len(c) for c in columns]
    for row_cells in cells:
        widths = [max(w, len(text)) for w, (text, _) in zip(widths, row_cells)]
    header = "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()
    rule = "  ".join("-" * w for w in widths)
    lines = [title] if title else []
    lines += [header, rule]
    for row_cells in cells:
        lines.append(
            "  ".join(
                (text.rjust(w) if is_num else text.ljust(w))
                for (text, is_num), w in zip(row_cells, widths)
            ).rstrip()
        )
    return "\n".join(lines)


def print_table(
    rows: Sequence[Mapping[str, Any] | Sequence[Any]],
    columns: Sequence[str],
    title: str | None = None,
    *,
    file: IO[str] | None = None,
    float_format: str = "{:.4g}",
) -> str:
    """Prints `format_table(...)` to `file` (default stdout) and returns the text."""
    text = format_table(rows, columns, title, float_format=float_format)
    print(text, file=sys.stdout if file is None else file, flush=True)
    return text
