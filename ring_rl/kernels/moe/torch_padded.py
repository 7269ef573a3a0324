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
real rows (`padding_pays`), the dispatcher keeps the loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ring_rl.kernels.moe.reference import combine_ref, permute_by_expert


def padded_layout(ids: torch.Tensor, num_experts: int):
    """The padding of `ids` [T, k]: (cap, source [E*cap]: the token of each padded row, T for
    padding; row_of_slot [T*k]: the padded row of each slot t*k + j, k)."""
    t, k = ids.shape
    order, offsets = permute_by_expert(ids, num_experts)    # slots by expert (slot s: token s // k)
    cap = int(torch.diff(offsets).max()) if t else 0
    expert = ids.reshape(-1)[order]
    row_of_sorted = expert * cap + torch.arange(order.numel(), device=ids.device) - offsets[expert]
    source = torch.full((num_experts * cap,), t, dtype=torch.long, device=ids.device)  # padding reads row t: zeros
    source[row_of_sorted] = order // k
    row_of_slot = torch.empty_like(row_of_sorted)
    row_of_slot[order] = row_of_sorted
    return cap, source, row_of_slot, k


def padding_pays(layout, num_experts: int) -> bool:
    """At most twice as many padded rows as real ones; more skewed routing keeps the loop."""
    cap, _, row_of_slot, _ = layout
    return cap * num_experts <= 2 * row_of_slot.numel()


def moe_experts_padded(x: torch.Tensor, weights: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                       layout) -> torch.Tensor:
    """Same contract as `moe_experts_ref` (the routing given as `padded_layout(ids, E)`):
    y [T, H] in x.dtype."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, w_gate_up, w_down)):
        return PaddedExperts.apply(x, weights, w_gate_up, w_down, layout)
    return _forward(x, weights, w_gate_up, w_down, layout)[0]


def _forward(x, weights, w_gate_up, w_down, layout):
    """→ (y, xp, gu, act, o_slots): the reference's roundings, in two bmm."""
    cap, source, row_of_slot, k = layout
    t, h = x.shape
    e, inter = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    xf = torch.cat([x.float(), x.new_zeros(1, h, dtype=torch.float32)])
    xp = xf[source].view(e, cap, h)
    gu = torch.bmm(xp, w_gate_up.to(x.dtype).float().transpose(1, 2))        # [E, cap, 2I]
    act = (F.silu(gu[..., :inter]) * gu[..., inter:]).to(x.dtype)
    o = torch.bmm(act.float(), w_down.to(x.dtype).float().transpose(1, 2)).to(x.dtype)  # [E, cap, H]
    o_slots = o.view(e * cap, h)[row_of_slot].view(t, k, h)
    return combine_ref(o_slots, weights.float(), x.dtype), xp, gu, act, o_slots


class PaddedExperts(torch.autograd.Function):
    """The padded forward; backward by hand: the same GEMMs transposed, the weight gradients
    laid out as the weights (autograd's bmm backward made [E, H, 2I] grads and copied them), one
    node instead of a dozen."""

    @staticmethod
    def forward(ctx, x, weights, w_gate_up, w_down, layout):
        y, xp, gu, act, o_slots = _forward(x, weights, w_gate_up, w_down, layout)
        ctx.save_for_backward(xp, gu, act, o_slots, weights, w_gate_up, w_down)
        ctx.layout, ctx.x_shape, ctx.x_dtype = layout, x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xp, gu, act, o_slots, weights, w_gate_up, w_down = ctx.saved_tensors
        cap, source, row_of_slot, k = ctx.layout
        (t, h), e, inter = ctx.x_shape, w_gate_up.shape[0], w_gate_up.shape[1] // 2
        dyf = dy.float()
        d_weights = (o_slots.float() * dyf[:, None, :]).sum(-1).to(weights.dtype)   # [T, k]
        d_o = dyf.new_zeros(e * cap, h)
        d_o[row_of_slot] = (weights.float()[:, :, None] * dyf[:, None, :]).reshape(t * k, h)
        d_o = d_o.view(e, cap, h)
        wd = w_down.to(ctx.x_dtype).float()
        d_w_down = torch.bmm(d_o.transpose(1, 2), act.float()).to(w_down.dtype)       # [E, H, I]
        d_act = torch.bmm(d_o, wd)                                                      # [E, cap, I]
        g, u = gu[..., :inter], gu[..., inter:]
        sig = torch.sigmoid(g)
        d_gu = torch.cat([d_act * u * sig * (1 + g * (1 - sig)), d_act * (g * sig)], -1)  # [E, cap, 2I]
        d_w_gate_up = torch.bmm(d_gu.transpose(1, 2), xp).to(w_gate_up.dtype)          # [E, 2I, H]
        d_xp = torch.bmm(d_gu, w_gate_up.to(ctx.x_dtype).float()).view(e * cap, h)
        dx = d_xp.new_zeros(t + 1, h).index_add_(0, source, d_xp)[:t].to(ctx.x_dtype)
        return dx, d_weights, d_w_gate_up, d_w_down, None
