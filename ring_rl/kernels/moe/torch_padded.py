"""The routed experts on CPU as two batched GEMMs over per-expert padded rows.

The reference loops over experts in Python: a dozen small ops per expert forward, and as many
autograd nodes backward. For a small model on a CPU that loop, not the arithmetic, is the
cost (the tiny model's 8 experts x 5 MoE layers, every rollout step and every update). Here
each expert's rows are copied into its own block of `cap` rows (cap = the busiest expert's
count; the padding rows are zeros and their outputs are dropped), so gate-up and down are one
`torch.bmm` each over [E, cap, *]. Same roundings as the reference (fp32 GEMMs on fp32
copies, h and o rounded to x's dtype, the same fixed-order combine); on this CPU the results
were bitwise the reference's (tests hold it to fp32 tolerance).

Padding costs E * cap - T * k wasted rows: when routing is so skewed that this exceeds the
real rows (`worth_padding`), the dispatcher keeps the loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ring_rl.kernels.moe.reference import combine_ref


def worth_padding(ids: torch.Tensor, num_experts: int) -> tuple[bool, torch.Tensor]:
    """(pad?, per-expert slot counts): pad when the padded rows are at most twice the real ones."""
    counts = torch.bincount(ids.reshape(-1), minlength=num_experts)
    return int(counts.max()) * num_experts <= 2 * ids.numel(), counts


def moe_experts_padded(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w_gate_up: torch.Tensor,
                       w_down: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `moe_experts_ref`: y [T, H] in x.dtype. counts: `worth_padding`'s."""
    t, h = x.shape
    k, e = ids.shape[1], w_gate_up.shape[0]
    inter = w_gate_up.shape[1] // 2
    flat = ids.reshape(-1)                                  # slot s = token s // k, choice s % k
    if counts is None:
        counts = torch.bincount(flat, minlength=e)
    cap = int(counts.max())
    order = torch.sort(flat, stable=True).indices           # slots by expert
    expert = flat[order]
    rank = torch.arange(flat.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[expert]
    row_of_sorted = expert * cap + rank                      # the padded row of each sorted slot
    source = torch.full((e * cap,), t, dtype=torch.long, device=x.device)  # padding reads row t: zeros
    source[row_of_sorted] = order // k
    xf = torch.cat([x.float(), x.new_zeros(1, h, dtype=torch.float32)])
    xp = xf[source].view(e, cap, h)
    gu = torch.bmm(xp, w_gate_up.to(x.dtype).float().transpose(1, 2))        # [E, cap, 2I]
    act = (F.silu(gu[..., :inter]) * gu[..., inter:]).to(x.dtype)
    o = torch.bmm(act.float(), w_down.to(x.dtype).float().transpose(1, 2)).to(x.dtype)  # [E, cap, H]
    row_of_slot = torch.empty_like(row_of_sorted)
    row_of_slot[order] = row_of_sorted
    return combine_ref(o.view(e * cap, h)[row_of_slot].view(t, k, h), weights.float(), x.dtype)
