"""Progress with rate and ETA: tqdm on a terminal; on a pipe or file, a plain line with
count, rate, elapsed time and ETA every `interval_s` seconds (no carriage returns)."""

from __future__ import annotations

import math
import sys
import time
from typing import IO, Any, Callable, Iterable, Iterator


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
