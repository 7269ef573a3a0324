"""Per-step metrics for a person: one JSONL line per step, TensorBoard curves, a console line."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tb = None
        if tensorboard:
            from tensorboard.compat.proto.summary_pb2 import Summary
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            self._summary = Summary

    def truncate_after(self, step: int) -> int:
        return truncate_jsonl(self.path, step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One row: the step, its wall-clock time (Unix seconds; row-to-row differences are
        the run's real pace, everything between steps included), the metrics."""
        row = {"step": step, "time": round(time.time(), 4), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            # One event holding every scalar of the step (what add_scalar writes per scalar:
            # ~100 events, protobufs and CRCs a step, ~15% of the driver's CPU time in py-spy).
            values = [self._summary.Value(tag=key, simple_value=float(value)) for key, value in row.items()
                      if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value)]
            self.tb.file_writer.add_summary(self._summary(value=values), step, row["time"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def truncate_jsonl(path: Path, step: int) -> int:
    """Drop lines of steps > `step` (a resumed run redoes them); returns lines kept."""
    if not path.exists():
        return 0
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(kept)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
