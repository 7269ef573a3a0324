"""The vLLM rollout engine: vLLM schedules and caches, ring-rl's model (plugin) computes.

Same three calls as `NativeEngine` (`generate`, `load_weights`, `weight_version`), the same
`RolloutBatch` out:

- logprobs: vLLM's `raw_logprobs` mode with the sampling temperature folded into the
  model's logits (`ring_set_logits_temperature`; vLLM then samples at T=1 with the same
  top-k/top-p). vLLM's raw logprobs are thus log_softmax(logits / T) in fp32, before
  top-k/top-p -- `ring_rl.model.sampling.token_logprobs`, what the trainer computes. (vLLM's
  `processed_logprobs` would be taken after top-k/top-p; `raw_logprobs` alone, before T.)
- router ids: per request, the experts every MoE layer chose at every position the engine
  ran ([moe layers, P + R - 1, top_k], as the native engine's), recorded by the model.
- weights: in memory, no disk: the tensors themselves through `collective_rpc` (the engine
  core runs in this process; safetensors bytes otherwise) into vLLM's in-place
  `reload_weights`, then the prefix cache is reset; the version moves with them.

Supported: vllm-cpu 0.32.0 on CPU (the separate `.venv-vllm`, scripts/setup_vllm_cpu.sh) and
vLLM 0.26.0 on CUDA (../shared/device/stage.sh stages it on the GPU machine,
scripts/gpu_vllm_checks.sh runs it there); the engine core in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0` by default), eager mode, no tensor parallelism, vLLM's V1
model runner (the one it picks for hybrid models). On a GPU, vLLM takes
`gpu_memory_utilization` of the card (a memory split with a colocated trainer). Weights arrive
as a state dict (object store, the trainer's broadcast, or CUDA IPC views of the trainer's GPU
buffers: `ring_rl.rl.weight_sync`) and go to the in-process worker as tensors.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ring_rl.rollout.common import StaleWeightsError, check_version_and_seeds  # noqa: F401 (re-exported)
from ring_rl.types import RolloutBatch, SamplingParams

EXTENSION = "ring_rl.rollout.vllm.extension.RingWorkerExtension"

# vLLM-on-CPU settings that must be in the environment before vLLM starts (see
# ../shared/docs/vllm.md): a bounded KV cache instead of most of the RAM, the engine core in
# this process (faster start, less memory), no one-off dynamo compile.
CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TORCHDYNAMO_DISABLE": "1",
}
# The same on a GPU: one process (the RPCs and the model are local; no spawned engine core
# that would need the plugin's entry point installed), the V1 runner, and torch's sampler
# rather than FlashInfer's (whose first-use JIT build took ~3 minutes on the H100).
GPU_ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_USE_V2_MODEL_RUNNER": "0",
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
}


class VllmEngine:
    def __init__(self, model_dir: str | os.PathLike, eos_token_ids: list[int], dtype: str = "fp32",
                 device: str = "cpu", max_model_len: int = 2048, seed: int = 0, weight_version: int = 0,
                 record_routes: bool = True, enable_prefix_caching: bool = False,
                 gpu_memory_utilization: float = 0.4, ignore_eos: bool = False, exact: bool = False,
                 **llm_kwargs):
        """exact (GPU): the model runs `BATCH_INVARIANT_OPS` (fixed-tile GEMMs, ring-rl's paged
        attention over vLLM's cache instead of its backend) and prompts are prefilled whole, so
        the trainer's exact pass (whole prefill, then one decode step per token) gives every
        token the same bits whatever vLLM batched it with."""
        if exact and device == "cpu":
            raise ValueError("exact mode with the vLLM engine needs a GPU (its KV-cache layout is "
                             "FLASH_ATTN's); on CPU use rollout.engine=native")
        for key, value in (CPU_ENV_DEFAULTS if device == "cpu" else GPU_ENV_DEFAULTS).items():
            os.environ.setdefault(key, value)
        if device != "cpu":
            llm_kwargs.setdefault("gpu_memory_utilization", gpu_memory_utilization)
        if device == "cpu":
            # vllm-cpu 0.32 crashes when a seeded request's step is a partial (chunked) prefill:
            # gpu_model_runner.py `_bookkeeping_sync` rewinds its generator with
            # `gen.set_offset`, which CPU generators refuse ("CPU Generator does not use
            # offset"). Whole prefills only, then; a step fits every prompt up to max_model_len.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
            llm_kwargs.setdefault("max_num_batched_tokens", max(max_model_len, 2048))
        if exact:  # never split a prompt over steps: the trainer replays whole prefills
            llm_kwargs.setdefault("enable_chunked_prefill", False)
            llm_kwargs.setdefault("max_num_batched_tokens", max(max_model_len, 8192))
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError(f"rollout.engine=vllm: vLLM cannot be imported here ({e}); on CPU run in "
                              f".venv-vllm (scripts/setup_vllm_cpu.sh)") from e
        from ring_rl.rollout.vllm.plugin import register

        register()  # what the entry point does; here too, for a checkout that is not pip-installed
        t0 = time.perf_counter()
        self.llm = LLM(
            model=str(Path(model_dir)), dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype],
            enforce_eager=True, max_model_len=max_model_len, seed=seed,
            enable_prefix_caching=enable_prefix_caching, logprobs_mode="raw_logprobs",
            worker_extension_cls=EXTENSION, **llm_kwargs)
        self.startup_s = time.perf_counter() - t0
        if exact:
            self._rpc("ring_set_ops", "batch_invariant")
        self.eos = sorted(set(eos_token_ids))
        self.record_routes = record_routes
        self.ignore_eos = ignore_eos  # benchmarks: every sequence runs to max_new_tokens
        self.weight_version = weight_version
        self.last_stats: dict[str, float] = {}
        self.last_trace, self.last_partial_ops = None, []

    def _take_trace(self, outs, prompt_lens: list[int]):
        import io

        from ring_rl.alignment_checks.trace import Trace
        from ring_rl.rollout.vllm.trace import remap

        raw = torch.load(io.BytesIO(self._rpc("ring_trace_take")[0]), weights_only=True)
        self.last_partial_ops = raw["partial_ops"]
        rid_index = {_caller_id(rid): i for rid, i in raw["rid_index"].items()}
        return remap(Trace(raw["values"], {}), rid_index, _prompt_order(outs), prompt_lens)

    def _rpc(self, method: str, *args):
        return self.llm.collective_rpc(method, args=args)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Replace the weights in place; names are the trainer model's state_dict names (or the
        checkpoint's). Every weight of the model must be present. With the engine core in this
        process (the default) the tensors go to the worker as they are (on a GPU: copied GPU to
        GPU); across processes, as safetensors bytes."""
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
            self._rpc("ring_load_weights_tensors", dict(state_dict))
        else:
            blob = save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()})
            self._rpc("ring_load_weights", blob)
        self.llm.reset_prefix_cache()  # cached KV was computed by the old weights
        self.weight_version = version

    def _vllm_params(self, params: SamplingParams, seed: int):
        from vllm import SamplingParams as VllmSamplingParams

        return VllmSamplingParams(
            temperature=1.0 if params.temperature > 0 else 0.0,  # T itself is in the logits
            top_p=params.top_p, top_k=params.top_k, max_tokens=params.max_new_tokens, seed=seed,
            logprobs=0, stop_token_ids=[] if self.ignore_eos else self.eos, ignore_eos=self.ignore_eos,
            detokenize=False)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, expected_version: int | None = None,
                 seeds: list[int] | None = None, group_ids: list[int] | None = None,
                 trace: bool = False) -> RolloutBatch:
        """trace=True (align-check): every op's output is recorded too, into `self.last_trace`
        (a `Trace` keyed by prompt index) and `self.last_partial_ops`."""
        seeds = check_version_and_seeds(self.weight_version, expected_version, params, len(prompts), seeds)
        t0 = time.perf_counter()
        n = len(prompts)
        self._rpc("ring_set_logits_temperature", params.temperature if params.temperature > 0 else 1.0)
        if self.record_routes:
            self._rpc("ring_routes_begin")
        if trace:
            self._rpc("ring_trace_begin")
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts],
                                 [self._vllm_params(params, s) for s in seeds], use_tqdm=False)
        routes = _by_request(load_safetensors(self._rpc("ring_routes_take")[0])) if self.record_routes else None
        if trace:
            self.last_trace = self._take_trace(outs, [len(p) for p in prompts])
        responses, logprobs, reasons, router_ids = [], [], [], []
        for o in outs:
            c = o.outputs[0]
            responses.append(torch.tensor(c.token_ids, dtype=torch.long))
            logprobs.append(torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)],
                                         dtype=torch.float32))
            reasons.append("eos" if c.finish_reason == "stop" else "length")
            if routes is not None:
                # Positions 0 .. P+R-2 were fed; with async scheduling vLLM may also have run
                # the last sampled token before it saw the request finish: not part of the rollout.
                r = routes.get(o.request_id)
                router_ids.append(None if r is None else r[:, : len(o.prompt_token_ids) + len(c.token_ids) - 1])
        batch = RolloutBatch(
            prompt_ids=[torch.tensor(p, dtype=torch.long) for p in prompts],
            response_ids=responses, logprobs=logprobs, finish_reasons=reasons,
            weight_version=self.weight_version, sampling=params,
            group_ids=list(group_ids) if group_ids is not None else list(range(n)),
            router_ids=router_ids if routes is not None else None,
            schedule=None,  # vLLM's batching is its own; exact mode does not need it (batch-invariant ops)
        )
        elapsed = time.perf_counter() - t0
        self.last_stats = {"rollout_s": elapsed, "rollout_tokens_per_s": batch.num_response_tokens / max(elapsed, 1e-9)}
        return batch


def _prompt_order(outs) -> dict[str, int]:
    return {o.request_id: i for i, o in enumerate(outs)}


def _caller_id(rid: str) -> str:
    """vLLM runs request `r` as `r-<8 random chars>`; its outputs carry `r`."""
    return rid.rsplit("-", 1)[0]


def _by_request(routes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_caller_id(rid): t for rid, t in routes.items()}
