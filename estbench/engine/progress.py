"""What a person watching a sweep sees: the cells as they complete, what is running, and an ETA.

Used by the command line and by ``estbench.run(progress=True)`` alike.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Optional

from estbench.engine import store


class Eta:
    """Remaining time of a sweep from the cells computed so far.

    Cells of different tasks differ in cost by orders of magnitude (a toy cell against a
    text_vae cell), and cached cells cost nothing, so "elapsed / done * left" misleads.
    Instead: the mean time of the computed cells of each task times that task's cells left
    (a task with none computed yet borrows the slowest task mean seen, an upper-ish guess),
    divided by the number of cells running at once.  None until one cell has been computed.
    """

    def __init__(self, cells, workers: int = 1):
        self.left = Counter(c.task for c in cells)
        self.times: dict = {}
        self.workers = max(1, int(workers))

    def done(self, cell, seconds: Optional[float]) -> Optional[float]:
        self.left[cell.task] -= 1
        if seconds is not None:
            self.times.setdefault(cell.task, []).append(float(seconds))
        if not self.times:
            return None
        means = {t: sum(v) / len(v) for t, v in self.times.items()}
        fallback = max(means.values())
        total = sum(n * means.get(t, fallback) for t, n in self.left.items() if n > 0)
        return total / self.workers


def _fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """What a person watching a sweep sees: one line for the cells already stored, then the cells
    as they are computed -- a tqdm bar on a terminal (failures printed above it), one line per cell
    elsewhere (logs, CI) -- with an ETA from :class:`Eta`, which ignores the stored cells; and,
    read from the cells' heartbeats in the results folder (store.Heartbeat), what the running
    cells are doing: on the bar, the longest-running cell's step and phase, refreshed every
    second; in a log, a line every minute for each cell running longer than a minute.

    ``sweep.run`` reports every stored cell before any computed one, so the stored cells are
    summed up in one line as soon as the first computed cell (or the end) arrives.
    """

    #: seconds between looks at the heartbeats (terminal, log) and a log line's minimum cell age
    POLL_BAR, POLL_LOG, LONG_CELL = 1.0, 60.0, 60.0

    def __init__(self, stream, quiet: bool, cells=(), workers: int = 1, where=None,
                 bar: Optional[bool] = None):
        self.stream, self.quiet, self.where = stream, quiet, where
        cells = list(cells)
        self.n = len(cells)
        self.eta = Eta(cells, workers)
        self.cached = 0
        self.flushed = False
        self.bar = None
        if bar is None:
            bar = bool(getattr(stream, "isatty", lambda: False)())
        self.use_bar = bar
        self._lock = threading.RLock()
        self._eta_text = "ETA ?"
        self._since = time.time()  # heartbeats of cells started before this sweep are stale
        self._stop = threading.Event()
        if not quiet and where is not None:
            threading.Thread(target=self._watch, name="estbench-progress", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

    def _flush_cached(self, n: int) -> None:
        if self.flushed:
            return
        self.flushed = True
        if self.cached and not self.quiet:
            where = f" in {self.where}" if self.where else ""
            print(f"{self.cached} of {n} cells already stored{where}: reused (--force recomputes them)",
                  file=self.stream, flush=True)

    def _ensure_bar(self, n: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=n - self.cached, file=self.stream, unit="cell",
                            dynamic_ncols=True, leave=True)

    @staticmethod
    def describe(beat: dict, now: float) -> str:
        """One running cell as a person reads it: label, time so far, step and phase."""
        return (f"{beat.get('label', beat.get('key', '?'))} {_fmt_duration(now - beat['started'])}: "
                f"step {beat.get('step', '?')}"
                + (f" of {beat['steps']}" if beat.get("steps") else "")
                + f", {beat.get('phase', '?')}")

    def _running(self) -> list[dict]:
        return [b for b in store.running(self.where) if b.get("started", 0) >= self._since - 1]

    def _watch(self) -> None:
        period = self.POLL_BAR if self.use_bar else self.POLL_LOG
        while not self._stop.wait(period):
            try:
                beats, now = self._running(), time.time()
                with self._lock:
                    if self._stop.is_set():
                        return
                    if self.use_bar:
                        if not beats:
                            continue
                        self._flush_cached(self.n)
                        self._ensure_bar(self.n)
                        more = f" (+{len(beats) - 1} running)" if len(beats) > 1 else ""
                        self.bar.set_postfix_str(f"{self.describe(beats[0], now)}{more}, "
                                                 f"{self._eta_text}", refresh=True)
                    else:
                        for beat in beats:
                            if now - beat["started"] >= self.LONG_CELL:
                                print(f"  running {self.describe(beat, now)}", file=self.stream,
                                      flush=True)
            except Exception:  # never let the display take a sweep down
                pass

    def __call__(self, i, n, cell, res, cached):
        with self._lock:
            self._record(i, n, cell, res, cached)
            if i == n:
                self.close()

    def _record(self, i, n, cell, res, cached):
        left = self.eta.done(cell, None if cached or res is None else res.seconds)
        if cached:
            self.cached += 1
            if i == n:
                self._flush_cached(n)
            return
        self._flush_cached(n)
        if self.quiet:
            return
        status = (res.status if res is not None else "stored by another worker") + \
            (f": {res.error}" if res is not None and res.error else "") + \
            (f" ({res.seconds:.1f}s)" if res is not None else "")
        eta = self._eta_text = f"ETA {_fmt_duration(left if i < n else 0)}"
        if self.use_bar:
            self._ensure_bar(n)
            if res is not None and res.status != "ok":
                self.bar.write(f"{cell.label()} ... {status}", file=self.stream)
            self.bar.set_postfix_str(f"{cell.task} x {cell.estimator}: {res.status if res else '-'}"
                                     f", {eta}", refresh=False)
            self.bar.update(1)
            if i == n:
                self.bar.close()
        else:
            print(f"[{i}/{n}] {cell.label()} ... {status}  {eta}", file=self.stream, flush=True)
