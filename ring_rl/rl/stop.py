"""A stop request (SIGTERM from `ring-rl stop` / `ray job stop`, or Ctrl-C) ends the run at the
end of the current step, after a checkpoint, instead of killing it mid-write.

The handler only sets a flag: the driver checks it between steps, where the trainer, the
data position and the metrics agree. A second signal stops at once (KeyboardInterrupt).
Install it after `ray.init`, which sets a SIGTERM handler of its own."""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("ring_rl.train")


class RunStopped(RuntimeError):
    """The run was asked to stop and did, after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # what a shell reports for a process ended by that signal


class StopRequest:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.signum = signum
        log.warning("%s received: stopping after this step, with a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
