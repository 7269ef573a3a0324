"""Self-test of the trainer's batching: packed, padded and one-by-one sequences must give the
same logprobs.

Packed: all sequences back to back in one flat batch with cu_seqlens (what the trainer
runs); a lightning layer whose state leaked from one packed sequence into the next would
move every later sequence's logprobs. One-by-one: each sequence alone. Padded: one
left-padded [B, T] batch through the transformers entry point (`model(ids, attention_mask)`).
With routing replay every variant takes the same recorded experts, so a router near-tie
that bf16 rounding tips one way or the other (batch-shape dependent) does not fail it.
The tolerance is per compute dtype: fp32 1e-5 (the same maths in a different summation
blocking differs by ~1e-6 on logprobs); bf16 5e-2 (a bf16 rounding of the logits is
~4e-3 relative, times logits of order ten).
"""
from __future__ import annotations

import torch

from ring_rl.model.sampling import token_logprobs
from ring_rl.trainer.logprobs import pack, score

SELFTEST_TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@torch.no_grad()
def packing_selftest(policy, model, seqs: list[torch.Tensor], masks: list[torch.Tensor],
                     temperature: float, tol: float, replay: list[torch.Tensor] | None = None,
                     moe_layers: list[int] | None = None) -> dict:
    """policy: the module the trainer scores with (FlatPolicy, or DeepSpeed around it);
    model: its RingLinearForCausalLM. seqs/masks (and replay, moe_layers: experts to force)
    as `trainer.logprobs.pack` takes them.

    Returns max |Δ| of packed and of padded against one-by-one, and passed."""
    device = next(model.parameters()).device
    packed = pack(seqs, masks, device, replay, moe_layers)
    lp_packed = packed.split(score(policy, packed, temperature, with_entropy=False)[0].float().cpu())
    alone = [pack([s], [m], device, None if replay is None else [replay[i]], moe_layers)
             for i, (s, m) in enumerate(zip(seqs, masks))]
    lp_alone = [score(policy, p, temperature, with_entropy=False)[0].float().cpu() for p in alone]
    lp_padded = _padded(model, seqs, masks, temperature, device, packed.replay_ids)
    d_packed = max(float((a - b).abs().max()) for a, b in zip(lp_packed, lp_alone))
    d_padded = max(float((a - b).abs().max()) for a, b in zip(lp_padded, lp_alone))
    return {"packed_vs_alone": d_packed, "padded_vs_alone": d_padded, "tol": tol,
            "sequences": len(seqs), "passed": bool(d_packed <= tol and d_padded <= tol)}


def _padded(model, seqs, masks, temperature, device, replay_ids=None) -> list[torch.Tensor]:
    """Left-padded batch of the inputs (each sequence minus its last token). replay_ids are in
    packed order, which is also the order of the padded batch's real tokens."""
    inputs = [s[:-1] for s in seqs]
    width = max(len(x) for x in inputs)
    ids = torch.zeros(len(inputs), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, x in enumerate(inputs):
        ids[i, width - len(x):], attn[i, width - len(x):] = x, 1
    logits = model(ids.to(device), attention_mask=attn.to(device), replay_ids=replay_ids).logits.float().cpu()
    out = []
    for i, (s, m) in enumerate(zip(seqs, masks)):
        rows = torch.nonzero(m[1:]).flatten()            # input row j predicts token j + 1
        cols = width - len(inputs[i]) + rows
        out.append(token_logprobs(logits[i, cols], s[1:][rows], temperature))
    return out
