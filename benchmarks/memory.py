"""The benchmarks' memory figures: this process's resident set, and its peak while a block runs (stdlib only, so the
NannyML runner in its own venv can use it too)."""
from __future__ import annotations
import threading, time

PAGE = 4096


def rss_mb() -> float:
    "This process's resident set size, in MB (from /proc)."
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 1e6


class PeakRss:
    "The highest resident set size seen while the block runs (sampled every 2 ms)."
    def __enter__(self):
        self.peak, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True); self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb()); time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set(); self._thread.join(); self.peak = max(self.peak, rss_mb())
