"""Plain-PyTorch definition of the MoE block's ops (the maths both engines must agree on).

Router (fp32 throughout):
    logits = x.float() @ gate_weight.float().T                         [T, E]
    scores = sigmoid(logits);  biased = scores + expert_bias            (bias: selection only)
    The E experts form n_group contiguous groups of E // n_group. A group's score is the sum
    of its two largest biased scores (largest + second largest, in that order); the
    topk_group best groups are kept, then the top_k experts by biased score inside them.
    ids [T, top_k] int64 are ordered by descending biased score.
    TIES: an equal score goes to the LOWER index, for groups and for experts alike (a stable
    descending sort here; first-max argmax in the Triton kernel) -- so both paths pick the
    same experts bitwise from the same scores.
    weights = scores[ids] / (scores[ids][0] + ... + scores[ids][k-1]) * routed_scaling_factor
    (the sum is taken left to right, j = 0..k-1, with no epsilon: sigmoid scores are > 0, so
    the sum cannot be 0). Gradients reach the logits through the weights only.

Experts (SwiGLU, w_gate_up [E, 2I, H]: rows :I gate_proj, rows I: up_proj; w_down [E, H, I]):
    for each slot (t, j) with e = ids[t, j]:
        g, u = x_t @ Wg_e.T, x_t @ Wu_e.T         (fp32 accumulation)
        h    = (silu(g) * u).to(x.dtype)          (activation in fp32, one rounding)
        o_tj = (h @ Wd_e.T).to(x.dtype)           (fp32 accumulation, one rounding)
    y_t = (w_t0 * o_t0 + w_t1 * o_t1 + ... ) in fp32, in the order j = 0..k-1, cast to x.dtype.
The reference computes the GEMMs on fp32 copies of the operands: products of bf16/fp16 values
are exact in fp32, so this is "x's dtype with fp32 accumulation" up to summation order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- router
def router_logits_ref(x: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """fp32 router logits [T, E] = x.float() @ gate_weight.float().T."""
    return x.float() @ gate_weight.float().T


def check_route_args(num_experts: int, top_k: int, n_group: int, topk_group: int) -> int:
    """Validates the grouping; returns the group size E // n_group."""
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"moe_route: n_group={n_group} must divide the {num_experts} experts")
    size = num_experts // n_group
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"moe_route: topk_group={topk_group} must be in [1, n_group={n_group}]")
    if n_group > 1 and size < 2:
        raise ValueError(f"moe_route: groups of {size} expert(s); a group's score is the sum "
                         f"of its top-2 experts, so each group needs >= 2 (E={num_experts}, "
                         f"n_group={n_group})")
    if not 1 <= top_k <= topk_group * size:
        raise ValueError(f"moe_route: top_k={top_k} must be in [1, topk_group * group size = "
                         f"{topk_group * size}]")
    return size


def _stable_topk_desc(v: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of the last dim; ties go to the lower index."""
    return torch.sort(v, dim=-1, descending=True, stable=True).indices[..., :k]


def select_experts_ref(scores: torch.Tensor, expert_bias: torch.Tensor | None, top_k: int,
                       n_group: int, topk_group: int) -> torch.Tensor:
    """Group-limited top-k selection on scores + bias -> ids [T, top_k] int64 (see module doc)."""
    t, e = scores.shape
    size = check_route_args(e, top_k, n_group, topk_group)
    biased = scores.float() if expert_bias is None else scores.float() + expert_bias.float()
    if n_group > 1:
        per_group = biased.view(t, n_group, size)
        top2 = torch.sort(per_group, dim=-1, descending=True).values[..., :2]
        group_score = top2[..., 0] + top2[..., 1]                          # [T, n_group]
        kept = _stable_topk_desc(group_score, topk_group)                  # [T, topk_group]
        keep = torch.zeros(t, n_group, dtype=torch.bool, device=scores.device)
        keep.scatter_(1, kept, True)
        biased = biased.masked_fill(~keep.repeat_interleave(size, dim=1), float("-inf"))
    return _stable_topk_desc(biased, top_k)


def route_weights(scores: torch.Tensor, ids: torch.Tensor, routed_scaling_factor: float,
                  norm_topk_prob: bool = True) -> torch.Tensor:
    """weights [T, k] fp32 from the unbiased scores of the chosen experts (differentiable).

    Shared by the reference and the Triton path (a gather and k-1 adds: nothing to fuse), so
    the weights are bitwise the same in both whenever the ids are."""
    w = scores.gather(1, ids)
    if norm_topk_prob:
        total = w[:, 0]
        for j in range(1, w.shape[1]):             # fixed order, j = 0..k-1
            total = total + w[:, j]
        w = w / total[:, None]
    return w * routed_scaling_factor


def moe_route_ref(logits, expert_bias, top_k, n_group, topk_group, routed_scaling_factor,
                  norm_topk_prob=True, replay_ids=None):
    """(weights fp32 [T, top_k], ids int64 [T, top_k]); see the module doc."""
    scores = torch.sigmoid(logits.float())
    if replay_ids is None:
        with torch.no_grad():
            ids = select_experts_ref(scores, expert_bias, top_k, n_group, topk_group)
    else:
        ids = replay_ids.to(device=logits.device, dtype=torch.int64)
    return route_weights(scores, ids, routed_scaling_factor, norm_topk_prob), ids


# ---------------------------------------------------------------------------- experts
def permute_by_expert(ids: torch.Tensor, num_experts: int):
    """Sort the T*k slots (t*k + j) by expert, stably (ties keep slot order).

    Returns (order, offsets): order [T*k] int64, the slot at each sorted position; offsets
    [E+1] int64, expert e owns sorted positions offsets[e]:offsets[e+1]. The inverse
    permutation is `order.argsort()` (or a scatter: inverse[order] = arange)."""
    flat = ids.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts + 1, device=ids.device, dtype=sorted_ids.dtype)
    return order, torch.searchsorted(sorted_ids, bounds)


def expert_mlp_ref(xe: torch.Tensor, w_gate_up_e: torch.Tensor, w_down_e: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """One expert on its rows xe [n, H] (fp32 copies): o [n, H] rounded to dtype."""
    inter = w_gate_up_e.shape[0] // 2
    gu = xe @ w_gate_up_e.to(dtype).float().T      # weights rounded to x's dtype, like x
    h = (F.silu(gu[:, :inter]) * gu[:, inter:]).to(dtype)
    return (h.float() @ w_down_e.to(dtype).float().T).to(dtype)


def combine_ref(o_slots: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y_t = sum_j weights[t, j] * o[t, j] in fp32, j = 0..k-1 in order, cast to dtype."""
    y = weights[:, 0, None] * o_slots[:, 0].float()
    for j in range(1, o_slots.shape[1]):
        y = y + weights[:, j, None] * o_slots[:, j].float()
    return y.to(dtype)


def moe_experts_ref(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                    w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """y [T, H] in x.dtype: the routed SwiGLU experts, a loop over experts (see module doc)."""
    t, h = x.shape
    k, e = ids.shape[1], w_gate_up.shape[0]
    order, offsets = permute_by_expert(ids, e)
    xf = x.float()
    tokens = order // k
    bounds = offsets.tolist()
    outs = []
    # unbind, not w[ex]: indexing per expert makes autograd zero-fill and add a full-size
    # weight gradient for every expert (O(E^2) memory traffic); unbind's backward is one stack.
    gate_ups, downs = w_gate_up.unbind(0), w_down.unbind(0)
    for ex in range(e):
        lo, hi = bounds[ex], bounds[ex + 1]
        if hi > lo:
            outs.append(expert_mlp_ref(xf[tokens[lo:hi]], gate_ups[ex], downs[ex], x.dtype))
    o_sorted = torch.cat(outs) if outs else x.new_zeros(0, h)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    o_slots = o_sorted[inverse].view(t, k, h)
    return combine_ref(o_slots, weights.float(), x.dtype)
