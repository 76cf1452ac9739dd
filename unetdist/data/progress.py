"""How far a long command is: a bar in a terminal, periodic log lines with count, rate and ETA otherwise.

A bar's carriage returns turn a log file into one unreadable line, and a batch job that prints nothing
for minutes looks hung, so outside a terminal progress goes to the log as whole lines, at most one per
`interval_s`, plus one at the end. Every long command (synth, shard, fetch, predict, bench, train) uses
this one class, so they all report the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("unetdist.progress")

T = TypeVar("T")
LOG_INTERVAL_S = 15.0


def _count(n: float) -> str:
    return str(n) if isinstance(n, int) else f"{n:.1f}"


def format_duration(seconds: float) -> str:
    """`1:02:03`, `2:03` or `5s`: short enough for a log line."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Counts units of work done out of `total` (None: unknown) and shows it.

    Args:
        total: units expected in all (a resumed run's `initial` included).
        desc: what is being done, e.g. "synth"; starts every line.
        unit: the unit counted, e.g. "image", "frame", "step".
        initial: units already done before this process started (a resumed run); the rate counts only new ones.
        enabled: False on ranks other than 0, so a job shows one progress.
        tty: bar (True) or log lines (False); default: whether stderr is a terminal.
        interval_s: at most one log line per this many seconds (0: one per update).
    """

    def __init__(self, total: float | None, desc: str, unit: str = "it", *, initial: float = 0, enabled: bool = True,
                 tty: bool | None = None, interval_s: float = LOG_INTERVAL_S) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.enabled, self.interval_s = enabled, interval_s
        self.postfix = ""
        self.start = self.last_line = time.monotonic()
        self.logged_n: float | None = None
        self.bar = None
        self._redirect: contextlib.ExitStack | None = None
        if enabled and (sys.stderr.isatty() if tty is None else tty):
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                            mininterval=0.5)
            self._redirect = contextlib.ExitStack()  # log lines print above the bar instead of through it
            self._redirect.enter_context(logging_redirect_tqdm())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1, postfix: str | None = None) -> None:
        """`n` more units done."""
        self.set(self.n + n, postfix)

    def set(self, n: float, postfix: str | None = None) -> None:
        """`n` units done in all (for loops that know their position, like a training step)."""
        if postfix is not None:
            self.postfix = postfix
        if self.bar is not None:
            self.bar.n = n
            self.bar.set_postfix_str(self.postfix, refresh=False)
            self.bar.update(0)  # redraws at most every mininterval
        self.n = n
        now = time.monotonic()
        if self.bar is None and self.enabled and now - self.last_line >= self.interval_s:
            self.last_line = now
            self._log(now)

    def rate(self, now: float | None = None) -> float:
        """Units per second since this process started counting."""
        now = time.monotonic() if now is None else now
        return (self.n - self.initial) / max(now - self.start, 1e-9)

    def line(self, now: float | None = None) -> str:
        """`synth: image 6/16 (38%), 1.52 image/s, elapsed 4s, ETA 7s`, the postfix after the count."""
        now = time.monotonic() if now is None else now
        rate = self.rate(now)
        if self.total:
            done = f"{self.unit} {_count(self.n)}/{_count(self.total)} ({100 * self.n / self.total:.0f}%)"
            eta = (self.total - self.n) / rate if rate > 0 else math.inf
            tail = f", ETA {format_duration(eta)}"
        else:
            done, tail = f"{self.unit} {_count(self.n)}", ""
        postfix = f" {self.postfix}" if self.postfix else ""
        elapsed = format_duration(now - self.start)
        return f"{self.desc}: {done}{postfix}, {rate:.3g} {self.unit}/s, elapsed {elapsed}{tail}"

    def _log(self, now: float | None = None) -> None:
        self.logged_n = self.n
        log.info("%s", self.line(now))

    def write(self, text: str) -> None:
        """A message that does not break the bar (log lines go to the log as they are)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            log.info("%s", text)

    def close(self) -> None:
        """Closes the bar, or logs the final count when the last line did not show it."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            if self._redirect is not None:
                self._redirect.close()
        elif self.enabled and self.logged_n != self.n:
            self._log()
        self.enabled = False


def track(items: Iterable[T], total: int | None, desc: str, unit: str = "it", **kwargs: object) -> Iterator[T]:
    """Yield `items`, counting one unit per item (see `Progress` for the keyword arguments)."""
    with Progress(total, desc, unit, **kwargs) as progress:  # type: ignore[arg-type]
        for item in items:
            yield item
            progress.update()
