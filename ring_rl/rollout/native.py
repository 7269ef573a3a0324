"""The native rollout engine: batched sampling with the model's slot cache.

Prefill packs every prompt into one flattened batch (optionally in chunks of
`prefill_chunk` tokens), then each decode step feeds one token per unfinished sequence
through the lightning layers' recurrent step and the softmax layers' KV cache.
Sequences finish at different times (EOS or max_new_tokens) and leave the batch.
"""
from __future__ import annotations

import time

import torch

from ring_rl.model import RingLinearForCausalLM, SeqBatch
from ring_rl.model.sampling import sample, token_logprobs
from ring_rl.types import RolloutBatch, SamplingParams


class StaleWeightsError(RuntimeError):
    """A rollout was asked for with a weight version the engine does not hold."""


class NativeEngine:
    def __init__(self, model: RingLinearForCausalLM, eos_token_ids: list[int], prefill_chunk: int = 0,
                 weight_version: int = 0):
        self.model = model.eval()
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
        self.prefill_chunk = prefill_chunk
        self.weight_version = weight_version
        self.last_stats: dict[str, float] = {}

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Replace the weights in place (strict: every name and shape must match)."""
        result = self.model.load_state_dict(state_dict, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise KeyError(f"weight update: missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
        self.weight_version = version

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, expected_version: int | None = None,
                 seeds: list[int] | None = None, group_ids: list[int] | None = None) -> RolloutBatch:
        if expected_version is not None and expected_version != self.weight_version:
            raise StaleWeightsError(f"rollout asked for weights v{expected_version}, engine holds v{self.weight_version}")
        t0 = time.perf_counter()
        n, dev = len(prompts), self.device
        seeds = seeds if seeds is not None else [params.seed * 1_000_003 + i for i in range(n)]
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        cache = self.model.new_cache(n, capacity=max(len(p) for p in prompts) + params.max_new_tokens)
        routes: list[list[dict[int, torch.Tensor]]] = [[] for _ in range(n)]

        last_logits = self._prefill(prompts, cache, routes)
        responses: list[list[int]] = [[] for _ in range(n)]
        logps: list[list[torch.Tensor]] = [[] for _ in range(n)]
        finish = ["length"] * n
        active = torch.arange(n, device=dev)
        eos = self.eos.to(dev)
        for step in range(params.max_new_tokens):
            rows = active.tolist()
            tokens = sample(last_logits, params.temperature, params.top_p, params.top_k, [gens[i] for i in rows])
            lp = token_logprobs(last_logits, tokens, params.temperature if params.temperature > 0 else 1.0)
            done = torch.isin(tokens, eos)
            for j, i in enumerate(rows):
                responses[i].append(int(tokens[j]))
                logps[i].append(lp[j])
                if done[j]:
                    finish[i] = "eos"
            keep = ~done
            if step == params.max_new_tokens - 1 or not bool(keep.any()):
                break
            active, tokens = active[keep], tokens[keep]
            batch = SeqBatch.build(torch.ones(active.numel(), dtype=torch.long, device=dev), cache, active)
            last_logits, out = self.model.forward_flat(tokens, batch)
            self._record(routes, active.tolist(), out.router_ids, torch.ones(active.numel(), dtype=torch.long))
        batch = RolloutBatch(
            prompt_ids=[torch.tensor(p, dtype=torch.long) for p in prompts],
            response_ids=[torch.tensor(r, dtype=torch.long) for r in responses],
            logprobs=[torch.stack(lp).float().cpu() if lp else torch.zeros(0) for lp in logps],
            finish_reasons=finish,
            weight_version=self.weight_version,
            sampling=params,
            group_ids=list(group_ids) if group_ids is not None else list(range(n)),
            router_ids=[self._stack_routes(r) for r in routes],
        )
        elapsed = time.perf_counter() - t0
        self.last_stats = {"rollout_s": elapsed, "rollout_tokens_per_s": batch.num_response_tokens / max(elapsed, 1e-9)}
        return batch

    def _prefill(self, prompts, cache, routes) -> torch.Tensor:
        """Run the prompts (in chunks if configured); return each one's last-position logits."""
        dev, n = self.device, len(prompts)
        lens = [len(p) for p in prompts]
        if min(lens) < 1:
            raise ValueError("every prompt needs at least one token")
        chunk = self.prefill_chunk or max(lens)
        last = [None] * n
        for start in range(0, max(lens), chunk):
            rows = [i for i in range(n) if lens[i] > start]
            pieces = [prompts[i][start:start + chunk] for i in rows]
            ids = torch.tensor([t for p in pieces for t in p], dtype=torch.long, device=dev)
            seqlens = torch.tensor([len(p) for p in pieces], dtype=torch.long, device=dev)
            slots = torch.tensor(rows, dtype=torch.long, device=dev)
            logits, out = self.model.forward_flat(ids, SeqBatch.build(seqlens, cache, slots))
            self._record(routes, rows, out.router_ids, seqlens.cpu())
            ends = torch.cumsum(seqlens, 0) - 1
            for j, i in enumerate(rows):
                if start + chunk >= lens[i]:
                    last[i] = logits[ends[j]]
        return torch.stack(last)

    @staticmethod
    def _record(routes, rows, router_ids: dict[int, torch.Tensor], seqlens: torch.Tensor) -> None:
        if not router_ids:
            return
        layers = sorted(router_ids)
        stacked = torch.stack([router_ids[l] for l in layers]).to(torch.int16).cpu()  # [L, N, k]
        for j, piece in enumerate(torch.split(stacked, seqlens.tolist(), dim=1)):
            routes[rows[j]].append(piece)

    @staticmethod
    def _stack_routes(pieces: list[torch.Tensor]) -> torch.Tensor | None:
        return torch.cat(pieces, dim=1) if pieces else None
