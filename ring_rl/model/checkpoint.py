"""HF-layout safetensors checkpoints with the real Ring-linear weight names, loaded strictly.

The model stores routed experts stacked (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]) for grouped GEMMs; on disk they are per expert
(`mlp.experts.{j}.{gate,up,down}_proj.weight`). `checkpoint_target` is the one mapping,
used by `from_pretrained` here and by the vLLM plugin's `load_weights`.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ring_rl.model.config import RingLinearConfig
from ring_rl.model.ops import DEFAULT_OPS, ModelOps

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint file or tensor that does not fit the model (names what is wrong)."""


def read_json_file(path: Path, missing: str = "missing") -> dict:
    """A checkpoint's JSON file, or CheckpointError naming it (absent, torn or not JSON)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def checkpoint_target(name: str) -> tuple[str, int | None, str | None]:
    """Checkpoint tensor name → (model parameter name, expert index, part)."""
    m = _EXPERT.match(name)
    if m is None:
        return name, None, None
    prefix, expert, part = m.group(1), int(m.group(2)), m.group(3)
    param = f"{prefix}.down_proj" if part == "down_proj" else f"{prefix}.gate_up_proj"
    return param, expert, part


def expert_slice(param: torch.Tensor, expert: int, part: str) -> torch.Tensor:
    """The view of a stacked expert parameter that one checkpoint tensor fills."""
    if part == "down_proj":
        return param[expert]
    inter = param.shape[1] // 2
    return param[expert, :inter] if part == "gate_proj" else param[expert, inter:]


def checkpoint_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's state as checkpoint-named tensors (experts unstacked)."""
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix, inter = name[: -len(".gate_up_proj")], tensor.shape[1] // 2
            for j in range(tensor.shape[0]):
                yield f"{prefix}.{j}.gate_proj.weight", tensor[j, :inter]
                yield f"{prefix}.{j}.up_proj.weight", tensor[j, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for j in range(tensor.shape[0]):
                yield f"{prefix}.{j}.down_proj.weight", tensor[j]
        else:
            yield name, tensor


def _is_skipped(name: str, config: RingLinearConfig) -> bool:
    """MTP weights are not used for inference or RL here."""
    if name.startswith("model.mtp"):
        return True
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    return bool(m) and config.num_nextn_predict_layers > 0 and int(m.group(1)) >= config.num_hidden_layers


def load_state_into(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor, str]]) -> None:
    """Copy (name, tensor, source file) into the model; every model tensor must be filled
    exactly once and every checkpoint tensor must have a home of the right shape."""
    state = model.state_dict()
    expected = {name for name, _ in checkpoint_tensors_meta(state)}
    seen: set[str] = set()
    for name, tensor, source in tensors:
        if _is_skipped(name, model.config):
            continue
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} (no such weight in {type(model).__name__})")
        param_name, expert, part = checkpoint_target(name)
        dest = state[param_name]
        if expert is not None:
            dest = expert_slice(dest, expert, part)
        if tuple(tensor.shape) != tuple(dest.shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(dest.shape)}")
        with torch.no_grad():
            dest.copy_(tensor)
        seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint is missing tensor {missing[0]!r}{more}")


def checkpoint_tensors_meta(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, None]]:
    class _Holder(torch.nn.Module):
        def state_dict(self):
            return state
    for name, _ in checkpoint_tensors(_Holder()):
        yield name, None


def save_checkpoint(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """config.json + model.safetensors, each written to a temp file and renamed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in checkpoint_tensors(model)}
    tmp = directory / f".{WEIGHTS_NAME}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / WEIGHTS_NAME)
    model.config.dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
    tmp_cfg = directory / ".config.json.tmp"
    tmp_cfg.write_text(model.config.to_json_string())
    os.replace(tmp_cfg, directory / "config.json")


def read_checkpoint(directory: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yield (name, tensor, file) from model.safetensors or a sharded index."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    elif (directory / WEIGHTS_NAME).exists():
        files = [WEIGHTS_NAME]
    else:
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}")
    for fname in files:
        path = directory / fname
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name), str(path)
        except (OSError, RuntimeError, Exception) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype a checkpoint's config.json names (transformers' `dtype`, formerly `torch_dtype`)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_checkpoint(directory: str | os.PathLike, config: RingLinearConfig | None = None,
                    dtype: torch.dtype | str | None = None, ops: ModelOps = DEFAULT_OPS):
    from ring_rl.model.config import load_model_config
    from ring_rl.model.modeling import RingLinearForCausalLM

    directory = Path(directory)
    config = config or load_model_config(directory)
    dtype = checkpoint_dtype(config) if dtype is None or dtype == "auto" else dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = RingLinearForCausalLM(config, ops=ops)
    model = model.to_empty(device="cpu").to(dtype)
    _restore_buffers(model)
    load_state_into(model, read_checkpoint(directory))
    return model.eval()


def _restore_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers (the decay schedule) are derived, not stored: recompute them."""
    for layer in model.model.layers:
        attn = layer.attention
        if hasattr(attn, "log_decay"):
            attn.log_decay = attn.ops.log_decay(attn.layer_idx, model.config.num_hidden_layers, attn.num_heads)
