"""A dependency-free progress bar for the demo's training loops (stderr, one line redrawn in place)."""

import sys
import time


class Progress:
    """``with Progress("label", total) as bar: bar.update(loss=...)`` draws ``label [#####.....] 50% loss 0.31``."""

    def __init__(self, label, total, enabled=True, width=24):
        self.label, self.total, self.enabled, self.width = label, max(1, total), enabled, width
        self.n, self.start, self.last = 0, time.perf_counter(), 0.0

    def __enter__(self):
        return self

    def update(self, k=1, **info):
        self.n += k
        now = time.perf_counter()
        if self.enabled and (now - self.last > 0.1 or self.n >= self.total):
            self.last = now
            done = int(self.width * self.n / self.total)
            extra = " ".join(f"{key} {value:.3g}" for key, value in info.items())
            sys.stderr.write(f"\r  {self.label:28s} [{'#' * done}{'.' * (self.width - done)}] "
                             f"{100 * self.n // self.total:3d}% {extra}   ")
            sys.stderr.flush()

    def __exit__(self, *exc):
        if self.enabled:
            sys.stderr.write(f"\r  {self.label:28s} done in {time.perf_counter() - self.start:.1f} s"
                             + " " * (self.width + 20) + "\n")
            sys.stderr.flush()
