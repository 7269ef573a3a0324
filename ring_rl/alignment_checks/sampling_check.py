"""Which distribution does each engine's logprob describe?

An engine that samples with temperature T and top-k/top-p can report the sampled token's
logprob under several distributions; rollout and trainer logprobs only compare like for
like when both mean the same one. Given an engine's own logits at the sampled positions,
its sampled tokens and the logprobs it reported, this names the candidates that reproduce
the reported values:

  raw        log_softmax(logits / T)                       ring-rl's definition (sampling.py)
  processed  log_softmax of logits / T after top-k/top-p   vLLM's `processed_logprobs` mode
  unscaled   log_softmax(logits)                           the temperature ignored

Candidates that coincide on every token (T = 1 makes raw = unscaled; no truncation that
bites makes raw = processed) cannot be told apart; the result says which pairs could.
"""
from __future__ import annotations

import torch

from ring_rl.model.sampling import filter_logits
from ring_rl.types import SamplingParams

CANDIDATES = ("raw", "processed", "unscaled")
DESCRIPTION = {
    "raw": "log_softmax(logits / T), before top-k/top-p",
    "processed": "log_softmax(logits / T) after top-k/top-p truncation",
    "unscaled": "log_softmax(logits), temperature ignored",
}


def candidate_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: SamplingParams) -> dict[str, torch.Tensor]:
    """Each candidate's logprob of `tokens` [M] from fp32 `logits` [M, V] (fp64 results)."""
    t = params.temperature if params.temperature > 0 else 1.0
    logits = logits.double()
    idx = tokens.long()[:, None]
    processed = filter_logits(logits, t, params.top_p, params.top_k)
    return {
        "raw": torch.log_softmax(logits / t, -1).gather(1, idx)[:, 0],
        "processed": torch.log_softmax(processed, -1).gather(1, idx)[:, 0],
        "unscaled": torch.log_softmax(logits, -1).gather(1, idx)[:, 0],
    }


def classify(logits: torch.Tensor, tokens: torch.Tensor, reported: torch.Tensor, params: SamplingParams,
             tol: float) -> dict:
    """{"matches": candidates within `tol` of `reported` on every token, "max_abs_err": per
    candidate, "distinguishable": pairs that differ by more than `tol` somewhere}."""
    cands = candidate_logprobs(logits, tokens, params)
    rep = reported.double()
    err = {name: float((c - rep).abs().max()) if rep.numel() else 0.0 for name, c in cands.items()}
    apart = [f"{a}/{b}" for i, a in enumerate(CANDIDATES) for b in CANDIDATES[i + 1:]
             if rep.numel() and float((cands[a] - cands[b]).abs().max()) > tol]
    return {"matches": [n for n in CANDIDATES if err[n] <= tol], "max_abs_err": err, "distinguishable": apart}


def sampling_semantics(rollout_logits, trainer_logits, tokens, rollout_lp, trainer_lp,
                       params: SamplingParams, tol: float) -> dict:
    """Classify both engines' logprobs, each against its own logits, and say if they agree.

    consistent: some candidate explains both. ok: consistent and each side matched one."""
    r = classify(rollout_logits, tokens, rollout_lp, params, tol)
    t = classify(trainer_logits, tokens, trainer_lp, params, tol)
    common = [n for n in r["matches"] if n in t["matches"]]
    return {"rollout": r, "trainer": t, "consistent": bool(common), "common": common,
            "ok": bool(common) and bool(r["matches"]) and bool(t["matches"]),
            "summary": _summary(r, t, common)}


def _summary(r: dict, t: dict, common: list[str]) -> str:
    def say(side: dict) -> str:
        if not side["matches"]:
            return "none of " + ", ".join(CANDIDATES)
        return " = ".join(side["matches"])
    verdict = "consistent" if common else "MISMATCH"
    return f"rollout logprobs: {say(r)}; trainer: {say(t)} -> {verdict}"
