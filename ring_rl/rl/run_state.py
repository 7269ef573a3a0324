"""Run checkpoints: `RUN/checkpoints/step_000012/` holds the trainer's weights and optimizer
(`trainer/`) and the driver's state (`driver_state.json`: step, data position, metrics).

A checkpoint is built in a temp directory and renamed into place, so a killed run never
leaves a half-written one under a real name; the newest N are kept. A resume takes the newest
checkpoint that verifies (JSON parses, every trainer file matches its sha256); a newer one that
does not is moved aside as `step_NNNNNN.refused-K` and the log says which file was wrong."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from ring_rl.model.checkpoint import CheckpointError, read_json_file
from ring_rl.trainer.checkpoint import read_state as read_trainer_state

log = logging.getLogger("ring_rl.train")
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
        """The driver state, refused (CheckpointError naming the file) unless it is complete."""
        path = ckpt / DRIVER_STATE
        state = read_json_file(path)
        missing = [k for k in ("step", "stream") if k not in state] if isinstance(state, dict) else ["step"]
        if missing:
            raise CheckpointError(f"{path}: no {missing[0]!r} entry (truncated or not a driver state)")
        return state

    @classmethod
    def verify(cls, ckpt: Path) -> dict:
        """Driver state and trainer files (sha256 of each) checked; returns the driver state."""
        state = cls.read_state(ckpt)
        read_trainer_state(ckpt / "trainer")
        return state

    def newest_valid(self) -> Path | None:
        """The newest checkpoint that verifies. Each newer one that does not is moved aside
        (kept for a person to inspect, no longer a resume candidate) with a warning naming
        the bad file; the fallback is logged."""
        refused = []
        for ckpt in reversed(self.complete()):
            try:
                self.verify(ckpt)
            except CheckpointError as e:
                aside = _free_name(ckpt.with_name(ckpt.name + ".refused"))
                os.rename(ckpt, aside)
                log.warning("checkpoint %s refused: %s (moved to %s)", ckpt.name, e, aside.name)
                refused.append(ckpt.name)
                continue
            if refused:
                log.warning("falling back to the previous checkpoint %s (refused: %s)", ckpt, ", ".join(refused))
            return ckpt
        if refused:
            log.warning("no usable checkpoint left in %s (refused: %s)", self.root, ", ".join(refused))
        return None

    def _prune(self) -> None:
        for old in self.complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".step_*.tmp-*"):
            if not stale.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)


def _free_name(path: Path) -> Path:
    k = 0
    while path.with_name(f"{path.name}-{k}").exists():
        k += 1
    return path.with_name(f"{path.name}-{k}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
