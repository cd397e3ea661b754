"""A progress bar on stderr for long offline jobs (rewrap, fsck).

Why hand-rolled: two tools need "n of N, current item" on one redrawn line, and nothing else;
when stderr is not a terminal it prints a line every ``every`` items instead, so logs stay small.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``tick(label)`` once per item; ``done()`` at the end."""

    def __init__(self, total: int, title: str, stream: TextIO | None = None, every: int = 100) -> None:
        self.total, self.title, self.count = total, title, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self.start = time.monotonic()

    def tick(self, label: str = "") -> None:
        self.count += 1
        if self.tty:
            width = 30
            filled = width * self.count // max(self.total, 1)
            bar = "#" * filled + "." * (width - filled)
            line = f"\r{self.title} [{bar}] {self.count}/{self.total} {label}"
            self.stream.write(line[:160].ljust(100))
            self.stream.flush()
        elif self.count % self.every == 0 or self.count == self.total:
            self.stream.write(f"{self.title}: {self.count}/{self.total}\n")
            self.stream.flush()

    def done(self) -> float:
        if self.tty:
            self.stream.write("\n")
        return time.monotonic() - self.start
