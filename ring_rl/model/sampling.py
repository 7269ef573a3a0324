"""Token logprobs and sampling: one function for both engines.

The logprob of a sampled token is taken under the temperature-scaled distribution,
log_softmax(logits / T), in fp32 — before top-k/top-p truncation. That is the
distribution the trainer's policy defines, so rollout and trainer logprobs compare like
for like; top-k/top-p only narrow which tokens can be drawn.
"""
from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [N, V] (any dtype), tokens [N] → fp32 [N]."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def filter_logits(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """Temperature-scaled fp32 logits with everything outside top-k / top-p set to -inf."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix that reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
           uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row (temperature 0: greedy), by Gumbel-max over `uniform` [N, V], the
    rows' U(0, 1) draws (SampleChooser draws each row's from its own generator, so a sequence's
    tokens do not depend on which others share the batch); None: the global generator."""
    if temperature <= 0:
        return logits.float().argmax(-1)
    scaled = filter_logits(logits, temperature, top_p, top_k)
    if uniform is None:
        uniform = torch.rand(scaled.shape, device=scaled.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
    return (scaled + gumbel.to(scaled.device)).argmax(-1)
