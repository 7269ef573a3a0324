"""The rollout worker a Ray actor wraps: one engine, versioned weights, tokens in and out.

Engines (native, or vLLM with ring-rl's model plugin) sit behind the same three calls: `generate`,
`load_weights`, `weight_version`. The worker is plain Python; `ring_rl.rl.placement`
turns it into a Ray actor, so it is testable without Ray.
"""
from __future__ import annotations

import os

import torch

from ring_rl.types import RolloutBatch, SamplingParams


class RolloutWorker:
    def __init__(self, model_dir: str, engine: str = "native", dtype: str = "fp32", device: str = "cpu",
                 prefill_chunk: int = 0, threads: int | None = None, gpu_memory_utilization: float = 0.4,
                 exact: bool = False, own_process: bool = False):
        """exact (alignment.mode=exact): on a GPU both engines run the batch-invariant op set
        (`ring_rl.model.ops.BATCH_INVARIANT_OPS`), as the trainer's exact pass does.
        own_process: the worker is a Ray actor, alone in its process (see ring_rl.gc_startup)."""
        if threads:
            torch.set_num_threads(threads)
        if engine not in ("native", "vllm"):
            raise ValueError(f"rollout.engine={engine!r}: expected 'native' or 'vllm'")
        from ring_rl.model import load_checkpoint, load_model_config
        from ring_rl.model.tokenizer import load_tokenizer

        tok = load_tokenizer(model_dir)
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        eos += [e for e in _as_list(load_model_config(model_dir).eos_token_id) if e is not None]
        if engine == "vllm":
            # Needs vLLM in this process's environment (on CPU: .venv-vllm, scripts/setup_vllm_cpu.sh).
            from ring_rl.rollout.vllm.engine import VllmEngine

            self.engine = VllmEngine(model_dir, eos, dtype=dtype, device=device,
                                     gpu_memory_utilization=gpu_memory_utilization, exact=exact)
        else:
            from ring_rl.rollout.native import NativeEngine

            torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
            model = load_checkpoint(model_dir, dtype=torch_dtype).to(device)
            if exact and device != "cpu":
                from ring_rl.model.ops import BATCH_INVARIANT_OPS, set_ops

                set_ops(model, BATCH_INVARIANT_OPS)
            self.engine = NativeEngine(model, eos, prefill_chunk=prefill_chunk)
        self.pid = os.getpid()
        self.device = device
        self._sync = None
        if own_process:
            from ring_rl.gc_startup import freeze_startup_objects

            freeze_startup_objects()

    def generate(self, prompts: list[list[int]], params: SamplingParams, expected_version: int | None = None,
                 seeds: list[int] | None = None, group_ids: list[int] | None = None) -> RolloutBatch:
        return self.engine.generate(prompts, params, expected_version, seeds, group_ids)

    def load_weights(self, version: int, state_dict: dict[str, torch.Tensor]) -> int:
        self.engine.load_weights(state_dict, version)
        return version

    def load_weights_payload(self, payload: tuple[int, dict[str, torch.Tensor]]) -> int:
        """The trainer's `weights_for_rollout()` result as it is (version, state dict)."""
        return self.load_weights(*payload)

    def load_weights_ipc(self, payload: dict) -> int:
        """rollout.weight_sync=cuda_ipc: copy the trainer's weights from its GPU memory."""
        from ring_rl.rl.weight_sync import open_ipc

        version, state = open_ipc(payload)
        self.engine.load_weights(state, version)
        del state
        torch.cuda.synchronize()  # copied before the trainer may refill its buffers
        return version

    def sync_join(self, host: str, port: int, rank: int, world: int, manifest, generation: int = 0) -> None:
        """Join the trainer's weight-sync group (`rollout.weight_sync: collective`)."""
        from ring_rl.rl.weight_sync import SyncGroup

        self._sync, self._manifest = SyncGroup(host, port, rank, world, self.device, generation), manifest

    def sync_receive(self) -> int:
        """Take the trainer's broadcast (on this actor's device); returns its weights version."""
        version, state = self._sync.receive(self._manifest)
        self.engine.load_weights(state, version)
        return version

    def weight_version(self) -> int:
        return self.engine.weight_version

    def stats(self) -> dict[str, float]:
        return dict(self.engine.last_stats)

    def get_pid(self) -> int:
        return self.pid


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]
