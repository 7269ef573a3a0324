"""The trainer as a Ray actor: the engine's methods, called remotely by the driver.

`ray.remote` on a class only records options; nothing connects to Ray until `.remote()` is
called, so importing this module works without a running cluster. Use `TrainerEngine`
directly where no actor is needed (tests, `ring-rl sft`)."""
from __future__ import annotations

import os

import ray

from ring_rl.gc_startup import freeze_startup_objects
from ring_rl.trainer.engine import TrainerEngine


@ray.remote
class TrainerActor(TrainerEngine):
    """TrainerEngine(model_dir, trainer_cfg, seed, device, num_threads, total_steps) in its
    own process: compute_logprobs, train_step, sft_step, weights_for_rollout, save, load,
    save_model."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        freeze_startup_objects()  # see ring_rl.gc_startup

    def get_pid(self) -> int:
        return os.getpid()

    # -- the trainer's end of the collective weight sync (ring_rl.rl.weight_sync) ---------------
    def sync_setup(self):
        """(host, port) for the group's store, and the manifest the receivers need."""
        from ring_rl.rl.weight_sync import free_address, manifest_of

        self._sync_manifest = manifest_of(self.model.state_dict())
        return free_address(), self._sync_manifest

    def sync_join(self, host: str, port: int, world: int, generation: int = 0) -> None:
        from ring_rl.rl.weight_sync import SyncGroup

        self._sync = SyncGroup(host, port, 0, world, self.device, generation)

    def weights_ipc(self) -> dict:
        """rollout.weight_sync=cuda_ipc: CUDA IPC handles to this version's weights (see
        ring_rl.rl.weight_sync.IpcSender; valid until the next call)."""
        from ring_rl.rl.weight_sync import IpcSender

        if getattr(self, "_ipc", None) is None:
            self._ipc = IpcSender()
        with self._gathered():
            return self._ipc.share(self.model.state_dict(), self.version)

    def sync_send(self) -> tuple[int, int]:
        """Broadcast the current weights (full tensors even under ZeRO-3) → (version, bytes)."""
        with self._gathered():
            sent = self._sync.send(self.model.state_dict(), self._sync_manifest, self.version)
        return self.version, sent
