"""The run directory's per-step files, written on one thread while the next step runs.

Between the trainer's answer for step n and the driver's call for step n+1 the trainer idles:
writing the token files, the samples and the metrics row there (10-15 ms on the tiny CPU
model) lengthened every step. They go to this writer instead: one thread, so the files are
written in the order they were submitted; `flush` waits for all of them (before a
checkpoint, the report, or the end of the run) and re-raises the first error of a write.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

log = logging.getLogger("ring_rl.train")


class BackgroundWriter:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ring-rl-writer")
        self._pending: list[Future] = []

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run fn(*args, **kwargs) after the writes submitted before it. The arguments must not
        change afterwards (the write reads them later). A failed earlier write raises here."""
        self._raise_finished()
        self._pending.append(self._pool.submit(fn, *args, **kwargs))

    def flush(self) -> None:
        """Wait for every submitted write; the first failure is raised (after all finished)."""
        pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def close(self, raise_errors: bool = True) -> None:
        """Flush and stop the thread. raise_errors=False logs a failed write instead (the
        caller is already raising an error of its own)."""
        try:
            self.flush()
        except Exception:
            if raise_errors:
                raise
            log.exception("a run-directory write failed")
        finally:
            self._pool.shutdown(wait=True)

    def _raise_finished(self) -> None:
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for f in done:
            f.result()
