"""Trainer checkpoints: HF weights + optimizer/scheduler/step state, written atomically.

Layout of a checkpoint directory:
    config.json, model.safetensors   the policy weights (exact HF names, `load_checkpoint` reads them)
    optimizer_rank{r}.pt              DeepSpeed optimizer state of rank r + LR scheduler + counters
    trainer_state.json                written last: step, version, ZeRO stage, world size, and the
                                      sha256 of every file above (a torn or flipped file is refused)

The optimizer file is loaded with `torch.load(weights_only=True)`, so it must hold only plain
data. DeepSpeed's optimizer state dicts carry a few objects (the loss scaler, an enum, slice
addresses) that are derived from the engine's configuration, not learned: `plain_state`
drops them on save and `merge_state` takes them from the live optimizer on load.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from ring_rl.model.checkpoint import (CheckpointError, load_state_into, read_checkpoint, read_json_file,
                                      save_checkpoint)

STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1
_SCALARS = (int, float, bool, str, type(None))  # exact types: an IntEnum is an int but not plain


def optimizer_file(rank: int) -> str:
    return f"optimizer_rank{rank}.pt"


# -- plain state dicts --------------------------------------------------------------------
def plain_state(obj):
    """A copy of a nested dict/list/tuple with every leaf that is not a tensor or a
    number/str/bool/None removed (dict entries dropped; list items kept only if plain).
    Tensors are copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if type(obj) in _SCALARS:
        return obj
    if type(obj) is dict or type(obj).__name__ == "OrderedDict":
        return {k: plain_state(v) for k, v in obj.items() if type(k) in (int, str) and _kept(v)}
    if type(obj) in (list, tuple):
        items = [plain_state(v) for v in obj if _kept(v)]
        return tuple(items) if type(obj) is tuple else items
    raise TypeError(f"plain_state: unexpected {type(obj).__name__}")


def _kept(v) -> bool:
    return isinstance(v, torch.Tensor) or type(v) in _SCALARS or type(v) in (dict, list, tuple) \
        or type(v).__name__ == "OrderedDict"


def merge_state(live, saved):
    """The live optimizer's state dict with every saved (plain) entry written over it."""
    if isinstance(live, dict) and isinstance(saved, dict):
        out = dict(live)
        for k, v in saved.items():
            out[k] = merge_state(live[k], v) if k in live else v
        return out
    if isinstance(live, list) and isinstance(saved, list) and len(live) == len(saved):
        return [merge_state(a, b) for a, b in zip(live, saved)]
    return saved


# -- files ----------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(final: Path, tag: int) -> Path:
    """Same name on every rank (no pid): all ranks write their optimizer file into it."""
    return final.with_name(f"{final.name}.tmp-{tag}")


def write_optimizer_file(staging: Path, rank: int, payload: dict) -> None:
    path = staging / optimizer_file(rank)
    torch.save(payload, path)
    _fsync(path)


def write_weights(staging: Path, model: torch.nn.Module) -> None:
    save_checkpoint(model, staging)


def commit(staging: Path, final: Path, meta: dict) -> Path:
    """Checksum every file, write trainer_state.json last, fsync, rename into place."""
    files = sorted(p for p in staging.iterdir() if p.is_file())
    for p in files:
        _fsync(p)
    state = {"format": FORMAT_VERSION, **meta, "files": {p.name: sha256_file(p) for p in files}}
    tmp = staging / (STATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, staging / STATE_FILE)
    _fsync(staging)
    old = None
    if final.exists():  # re-saving under the same name: keep the old one until the new is in place
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(staging, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# -- reading ----------------------------------------------------------------------------------
def read_state(directory: Path) -> dict:
    """trainer_state.json, with every listed file's checksum verified."""
    path = directory / STATE_FILE
    state = read_json_file(path, "missing (not a trainer checkpoint, or an unfinished one)")
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {state.get('format')!r}, expected {FORMAT_VERSION}")
    for name, digest in state["files"].items():
        f = directory / name
        if not f.exists():
            raise CheckpointError(f"{f}: listed in {STATE_FILE} but missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{f}: checksum mismatch (truncated or corrupt file)")
    return state


def read_optimizer_file(directory: Path, rank: int) -> dict:
    path = directory / optimizer_file(rank)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # truncated zip, unpickling refused, ...
        raise CheckpointError(f"{path}: unreadable optimizer state ({type(e).__name__}: {e})") from None


def load_weights_into(model: torch.nn.Module, directory: Path) -> None:
    load_state_into(model, read_checkpoint(directory))
