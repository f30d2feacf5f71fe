"""Progress on stderr while a run works: tasks done / failed / running, elapsed, ETA.

On a terminal it redraws one line; elsewhere (CI logs, ``ray job logs``) it prints a line at most
every ``interval_s`` seconds and at the end. Must not import ray or click.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """A progress bar over ``total`` tasks."""

    def __init__(self, total: int, stream=None, *, interval_s: float = 5.0, width: int = 24):
        self.total, self.done, self.failed, self.running = total, 0, 0, 0
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval_s, self.width = (0.2 if self.tty else interval_s), width
        self.t0 = time.monotonic()
        self._last = 0.0

    def update(self, *, running: int | None = None) -> None:
        if running is not None:
            self.running = running
        self._draw()

    def advance(self, *, failed: bool = False, running: int | None = None) -> None:
        self.done += 1
        self.failed += int(failed)
        self.update(running=running)

    def close(self) -> None:
        self._draw(force=True)
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        filled = int(self.width * self.done / self.total) if self.total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        return (f"[{bar}] {self.done}/{self.total} done, {self.failed} failed, "
                f"{self.running} running, {_clock(elapsed)} elapsed, ETA {_clock(eta)}")

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        self.stream.write(("\r" + self.line() + "\x1b[K") if self.tty else self.line() + "\n")
        self.stream.flush()


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:02d}:{s:02d}"
