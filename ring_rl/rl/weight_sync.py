"""Trainer → rollout weights over a collective: NCCL between GPUs, gloo on CPU.

The default path (`rollout.weight_sync: object_store`) copies the trainer's state dict to host
memory and hands it to every rollout actor through Ray's object store. With
`rollout.weight_sync: collective` the trainer broadcasts the weights instead, from its device
straight to each rollout actor's device (the split layout: trainer on one GPU, vLLM on
another), over a process group of its own: rank 0 is the trainer, rank i + 1 rollout actor i.
The group is built from a TCP store rather than torch.distributed's default group, which
DeepSpeed (trainer) and vLLM (rollout) already own in their processes.

A sync is the weights' version (one int64), then one broadcast per dtype: the trainer packs
the state dict into one flat buffer per dtype in manifest order. The receivers got the manifest (names, shapes, dtypes) once, at setup, and
unpack views of their buffers.

With `rollout.weight_sync: cuda_ipc` (colocated actors sharing one GPU) the trainer packs the
same flat buffers on its GPU and hands out CUDA IPC handles to them through Ray instead
(`IpcSender`, `open_ipc`): each rollout actor maps the trainer's memory and copies from it.
"""
from __future__ import annotations

import math
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

Manifest = list[tuple[str, tuple[int, ...], str]]  # (name, shape, dtype name), in send order
TIMEOUT = timedelta(seconds=600)


def free_address() -> tuple[str, int]:
    """This node's address and a free TCP port, for the group's store (rank 0 serves it)."""
    import ray

    host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    with socket.socket() as s:
        s.bind(("", 0))
        return host, s.getsockname()[1]


def manifest_of(state: dict[str, torch.Tensor]) -> Manifest:
    return [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in state.items()]


def _by_dtype(manifest: Manifest) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, (_, _, dtype) in enumerate(manifest):
        groups.setdefault(dtype, []).append(i)
    return groups


def _flat_parts(state: dict[str, torch.Tensor], manifest: Manifest, idx: list[int]) -> list[torch.Tensor]:
    """The tensors of manifest entries `idx` flattened, in order: one dtype's buffer, to cat."""
    return [state[manifest[i][0]].detach().reshape(-1) for i in idx]


def _unpack(flat: torch.Tensor, manifest: Manifest, idx: list[int], out: dict[str, torch.Tensor]) -> None:
    """Views of one dtype's flat buffer, by name, into `out`."""
    sizes = [math.prod(manifest[i][1]) for i in idx]
    for i, part in zip(idx, flat.split(sizes)):
        out[manifest[i][0]] = part.view(manifest[i][1])


class SyncGroup:
    """One member of the weight-sync group (call the constructor on every rank at once: it
    waits for all of them)."""

    def __init__(self, host: str, port: int, rank: int, world: int, device: str | torch.device,
                 generation: int = 0):
        self.rank, self.world, self.device = rank, world, torch.device(device)
        store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=TIMEOUT)
        prefix = dist.PrefixStore(f"ring-rl-weights-{generation}", store)
        if self.device.type == "cuda":
            self.pg = dist.ProcessGroupNCCL(prefix, rank, world)
        else:
            self.pg = dist.ProcessGroupGloo(prefix, rank, world, TIMEOUT)
        self._store = store  # rank 0 serves it: keep it alive as long as the group

    def send(self, state: dict[str, torch.Tensor], manifest: Manifest, version: int) -> int:
        """Rank 0: broadcast `version` and `state` (every manifest entry); returns the bytes sent."""
        self.pg.broadcast(torch.tensor([version], dtype=torch.int64, device=self.device), 0).wait()
        sent = 0
        for idx in _by_dtype(manifest).values():
            flat = torch.cat([t.to(self.device) for t in _flat_parts(state, manifest, idx)])
            self.pg.broadcast(flat, 0).wait()
            sent += flat.numel() * flat.element_size()
        return sent

    def receive(self, manifest: Manifest) -> tuple[int, dict[str, torch.Tensor]]:
        """Other ranks: (version, the broadcast state dict as views of one buffer per dtype)."""
        version = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.pg.broadcast(version, 0).wait()
        out: dict[str, torch.Tensor] = {}
        for dtype, idx in _by_dtype(manifest).items():
            sizes = [math.prod(manifest[i][1]) for i in idx]
            flat = torch.empty(sum(sizes), dtype=getattr(torch, dtype), device=self.device)
            self.pg.broadcast(flat, 0).wait()
            _unpack(flat, manifest, idx, out)
        return int(version.item()), {name: out[name] for name, _, _ in manifest}



# -- rollout.weight_sync: cuda_ipc (colocated: trainer and rollout actors on one GPU) ----------
class IpcSender:
    """The trainer's end: the state dict packed into one flat buffer per dtype on its GPU
    (allocated once, refilled at every sync) and shared by CUDA IPC handle, so a rollout
    actor on the same GPU copies the weights GPU to GPU, never through host memory."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def share(self, state: dict[str, torch.Tensor], version: int) -> dict:
        from torch.multiprocessing.reductions import reduce_tensor

        manifest = manifest_of(state)
        device = next(iter(state.values())).device
        if device.type != "cuda":
            raise ValueError(f"rollout.weight_sync=cuda_ipc: the trainer's weights are on {device}, not a GPU")
        handles = {}
        for dtype, idx in _by_dtype(manifest).items():
            total = sum(math.prod(manifest[i][1]) for i in idx)
            buf = self.buffers.get(dtype)
            if buf is None or buf.numel() != total:
                buf = self.buffers[dtype] = torch.empty(total, dtype=getattr(torch, dtype), device=device)
            torch.cat(_flat_parts(state, manifest, idx), out=buf)
            handles[dtype] = reduce_tensor(buf)
        torch.cuda.synchronize(device)  # the buffers are complete before a receiver reads them
        return {"version": version, "manifest": manifest, "handles": handles, "gpu": _gpu_uuid(device)}


def open_ipc(payload: dict) -> tuple[int, dict[str, torch.Tensor]]:
    """A rollout actor's end: (version, the state dict as views of the trainer's buffers).
    Copy them into the engine, then drop them (the trainer refills the buffers next sync)."""
    here = torch.device("cuda", torch.cuda.current_device())
    if _gpu_uuid(here) != payload["gpu"]:
        raise RuntimeError(f"rollout.weight_sync=cuda_ipc: this rollout actor's GPU ({_gpu_uuid(here)}) is not "
                           f"the trainer's ({payload['gpu']}); CUDA IPC shares memory within one GPU only: "
                           "colocate them or use weight_sync=collective")
    manifest, out = payload["manifest"], {}
    for dtype, idx in _by_dtype(manifest).items():
        rebuild, args = payload["handles"][dtype]
        _unpack(rebuild(*args), manifest, idx, out)
    return int(payload["version"]), {name: out[name] for name, _, _ in manifest}


def _gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)
