"""A dependency-free progress bar on stderr: redrawn in place on a terminal, a line every tenth otherwise
(logs of CI jobs and batch schedulers stay readable)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, description: str, enabled: bool = True, stream=None):
        self.total, self.description, self.enabled = total, description, enabled
        self.stream = stream or sys.stderr
        self.done, self.items, self.start, self.fields = 0, 0, time.perf_counter(), ""
        self.last_tenth = -1
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled and self.interactive:
            self.stream.write("\n")
            self.stream.flush()

    def step(self, items: int = 1, **fields) -> None:
        """One step done, covering `items` images; fields (e.g. loss=0.5) are shown with it."""
        self.done += 1
        self.items += items
        if fields:
            self.fields = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        line = (f"{self.description} {self.done}/{self.total}  {self.fields}  "
                f"{self.items / max(elapsed, 1e-9):.1f} img/s  {elapsed:.0f} s")
        tenth = 10 * self.done // max(self.total, 1)
        if self.interactive:
            self.stream.write("\r" + line + " " * 8)
        elif tenth != self.last_tenth or self.done == self.total:
            self.stream.write(line + "\n")
        self.last_tenth = tenth
        self.stream.flush()
