"""The native rollout engine: batched sampling with the model's slot cache.

The schedule is `ring_rl.model.stepping.run_schedule`: prefill packs every prompt into one
flattened batch (optionally in chunks of `prefill_chunk` tokens), then each decode step feeds
one token per unfinished sequence through the lightning layers' recurrent step and the
softmax layers' KV cache. Sequences finish at different times (EOS or max_new_tokens) and
leave the batch. The trainer's exact mode replays the same schedule (see that module).
"""
from __future__ import annotations

import time

import torch

from ring_rl.model import RingLinearForCausalLM
from ring_rl.model.stepping import SampleChooser, reusable_cache, run_schedule, stack_routes
from ring_rl.rollout.common import StaleWeightsError, check_version_and_seeds  # noqa: F401 (re-exported)
from ring_rl.types import RolloutBatch, SamplingParams


class NativeEngine:
    def __init__(self, model: RingLinearForCausalLM, eos_token_ids: list[int], prefill_chunk: int = 0,
                 weight_version: int = 0):
        self.model = model.eval()
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
        self.prefill_chunk = prefill_chunk
        self.weight_version = weight_version
        self.last_stats: dict[str, float] = {}
        self._cache = None

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @torch.no_grad()
    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Replace the weights in place (strict: every name and shape must match). A plain
        copy per tensor: a third of load_state_dict's time, which walks every module."""
        own = self.model.state_dict(keep_vars=True)
        if own.keys() != state_dict.keys():
            missing, unexpected = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
            raise KeyError(f"weight update: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, tensor in own.items():
            if tensor.shape != state_dict[name].shape:
                raise ValueError(f"weight update: {name} has shape {tuple(state_dict[name].shape)}, "
                                 f"the model's is {tuple(tensor.shape)}")
            tensor.copy_(state_dict[name])
        self.weight_version = version

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, expected_version: int | None = None,
                 seeds: list[int] | None = None, group_ids: list[int] | None = None) -> RolloutBatch:
        seeds = check_version_and_seeds(self.weight_version, expected_version, params, len(prompts), seeds)
        t0 = time.perf_counter()
        n = len(prompts)
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        chooser = SampleChooser(params.temperature, params.top_p, params.top_k, gens, self.eos, params.max_new_tokens)
        # The slot cache is kept between calls of the same size: zeroing a new one took ~8% of
        # a CPU rollout (256 sequences of the tiny model: 34 MB of lightning states).
        self._cache = reusable_cache(self._cache, self.model, n) or self.model.new_cache(
            n, capacity=max(len(p) for p in prompts) + params.max_new_tokens)
        res = run_schedule(self.model, prompts, params.max_new_tokens, chooser,
                           temperature=params.temperature if params.temperature > 0 else 1.0,
                           prefill_chunk=self.prefill_chunk, cache=self._cache)
        batch = RolloutBatch(
            prompt_ids=[torch.tensor(p, dtype=torch.long) for p in prompts],
            response_ids=[torch.tensor(r, dtype=torch.long) for r in res.tokens],
            logprobs=[lp.float().cpu() for lp in res.logprobs],
            finish_reasons=["eos" if f else "length" for f in res.finished_by_choice],
            weight_version=self.weight_version,
            sampling=params,
            group_ids=list(group_ids) if group_ids is not None else list(range(n)),
            router_ids=[stack_routes(r) for r in res.routes],
            schedule=[list(range(n))],
            prefill_chunk=self.prefill_chunk,
        )
        elapsed = time.perf_counter() - t0
        self.last_stats = {"rollout_s": elapsed, "rollout_tokens_per_s": batch.num_response_tokens / max(elapsed, 1e-9)}
        return batch
