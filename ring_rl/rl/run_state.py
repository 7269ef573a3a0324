"""Run checkpoints: `RUN/checkpoints/step_000012/` holds the trainer's weights and optimizer
(`trainer/`) and the driver's state (`driver_state.json`: step, data position, metrics).

A checkpoint is built in a temp directory and renamed into place, so a killed run never
leaves a half-written one under a real name; the newest N are kept."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

DRIVER_STATE = "driver_state.json"
_NAME = re.compile(r"^step_(\d{6,})$")


class CheckpointDirs:
    def __init__(self, run_dir: str | os.PathLike, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)

    def staging(self, step: int) -> Path:
        tmp = self.root / f".step_{step:06d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, staging: Path, step: int, driver_state: dict) -> Path:
        """Write the driver state last, then rename the whole directory into place."""
        state_tmp = staging / (DRIVER_STATE + ".tmp")
        with open(state_tmp, "w") as f:
            json.dump({"step": step, **driver_state}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(state_tmp, staging / DRIVER_STATE)
        final = self.root / f"step_{step:06d}"
        if final.exists():  # a resumed run re-saving a step it had saved before
            shutil.rmtree(final)
        os.rename(staging, final)
        _fsync_dir(self.root)
        self._prune()
        return final

    def complete(self) -> list[Path]:
        """Checkpoints with a driver state, oldest first (temp dirs never match the name)."""
        found = [p for p in self.root.iterdir() if _NAME.match(p.name) and (p / DRIVER_STATE).exists()]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    @staticmethod
    def read_state(ckpt: Path) -> dict:
        with open(ckpt / DRIVER_STATE) as f:
            return json.load(f)

    def _prune(self) -> None:
        for old in self.complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".step_*.tmp-*"):
            if not stale.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
