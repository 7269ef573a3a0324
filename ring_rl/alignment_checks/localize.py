"""Where the rollout/trainer gap starts: per-op relative errors, recurrent states, router
flips, and the full-vocabulary divergence at the sampled positions.

Both traces hold, for every (layer, op), each sequence's rows by input position. An op's
error is the per-token relative error ‖a_t − b_t‖ / ‖b_t‖ (a = rollout, b = trainer) over
the positions both engines ran, reported as its max and as ‖A − B‖_F / ‖B‖_F over all of
them. The first (layer, op) in execution order whose max exceeds the noise floor is where
the gap starts: everything downstream inherits it.

The noise floor is what two correct engines differ by when they run the same maths in a
different order (chunked scan vs one-token recurrence, other batch shapes). It is set per
compute dtype from the unit roundoff u (fp32 2^-24, bf16 2^-8):
- fp32: reordering a length-K sum moves it by about √K·u relative, and each layer passes on
  (and can amplify) what comes in; on the tiny model correct engines reach 2e-5 after six
  layers. The bugs worth finding are of bf16 rounding size or worse: one bf16 rounding is
  ≥ 2^-9 ≈ 2e-3 relative in norm, and the injected ones start at 3.5e-3. The floor sits
  between the two, a decade from each: 2^12·u = 2^-12 ≈ 2.4e-4.
- bf16 / fp16: every op's output is rounded, so two orders differ by one or two ulps of a
  rounded vector, ≈ u in norm per rounding, and a few roundings chain inside one op: the
  floor is 4·u (≈ 1.6e-2 in bf16). A bf16 model cannot reveal a bf16-sized bug below it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ring_rl.alignment_checks.trace import Trace

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11,
                 torch.float64: 2.0 ** -53}


def noise_floor(dtype: torch.dtype) -> float:
    """Largest per-token relative error two correct engines show in this compute dtype."""
    u = UNIT_ROUNDOFF[dtype]
    return 2.0 ** 12 * u if dtype in (torch.float32, torch.float64) else 4.0 * u


def coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if UNIT_ROUNDOFF[a] >= UNIT_ROUNDOFF[b] else b


@dataclass
class OpDiff:
    layer: int | None     # None: after the decoder stack
    op: str
    rel_max: float        # max over tokens of ‖a_t − b_t‖ / ‖b_t‖
    rel_all: float        # ‖A − B‖_F / ‖B‖_F over all compared tokens
    tokens: int
    worst_seq: int
    worst_pos: int

    def as_dict(self) -> dict:
        return asdict(self)


def compare_traces(rollout: Trace, trainer: Trace) -> list[OpDiff]:
    """Every (layer, op) both traces hold, in execution order."""
    out = []
    for key in rollout.keys_in_order():
        if key not in trainer.values:
            continue
        num = den = 0.0
        worst = (-1.0, -1, -1)
        tokens = 0
        for seq, (pos_a, a) in rollout.values[key].items():
            if seq not in trainer.values[key]:
                continue
            pos_b, b = trainer.values[key][seq]
            common, ia, ib = _intersect(pos_a, pos_b)
            if common.numel() == 0:
                continue
            da, db = a[ia].double(), b[ib].double()
            err, ref = (da - db).norm(dim=1), db.norm(dim=1)
            rel = err / ref.clamp_min(1e-30)
            j = int(rel.argmax())
            if rel[j] > worst[0]:
                worst = (float(rel[j]), seq, int(common[j]))
            num, den, tokens = num + float(err.pow(2).sum()), den + float(ref.pow(2).sum()), tokens + common.numel()
        if tokens:
            out.append(OpDiff(key[0], key[1], worst[0], math.sqrt(num / max(den, 1e-300)), tokens,
                              worst[1], worst[2]))
    return out


def first_divergence(diffs: list[OpDiff], floor: float) -> OpDiff | None:
    return next((d for d in diffs if not d.rel_max <= floor), None)  # NaN counts as diverged


def state_diffs(rollout: Trace, trainer: Trace) -> dict[int, float]:
    """Per lightning layer: max over sequences of ‖S_rollout − S_trainer‖_F / ‖S_trainer‖_F,
    the recurrent state at the end of the prompt."""
    out = {}
    for layer in sorted(set(rollout.states) & set(trainer.states)):
        rels = [float((rollout.states[layer][s] - trainer.states[layer][s]).norm()
                      / trainer.states[layer][s].norm().clamp_min(1e-30))
                for s in rollout.states[layer] if s in trainer.states[layer]]
        if rels:
            out[layer] = max(rels)
    return out


def router_flips(rollout_ids: list, trainer_ids: list, moe_layers: list[int], prompt_lens: list[int],
                 buckets: int = 16) -> tuple[dict[int, float], list[list[float]], list[int]]:
    """Per MoE layer, the share of tokens (all input positions) whose expert set differs;
    and a [layer][bucket] grid of the same over response positions, for the heatmap
    (bucket b covers response positions edges[b] .. edges[b+1] - 1)."""
    pairs = [(r.long().sort(-1).values, t.long().sort(-1).values, p)
             for r, t, p in zip(rollout_ids, trainer_ids, prompt_lens)
             if r is not None and t is not None and r.shape == t.shape and r.shape[1] > 0]
    if not pairs or not moe_layers:
        return {}, [], []
    flips = [(r != t).any(-1) for r, t, _ in pairs]  # [L, n_i]
    rate = torch.cat(flips, 1).double().mean(1)
    # Response position j of a sequence with prompt P is input position P - 1 + j.
    resp = [(f[:, p - 1:], p) for f, (_, _, p) in zip(flips, pairs)]
    longest = max(f.shape[1] for f, _ in resp)
    edges = sorted({round(i * longest / buckets) for i in range(buckets + 1)})
    grid = []
    for li in range(len(moe_layers)):
        row = []
        for lo, hi in zip(edges, edges[1:]):
            vals = torch.cat([f[li, lo:hi] for f, _ in resp])
            row.append(float(vals.double().mean()) if vals.numel() else math.nan)
        grid.append(row)
    return {layer: float(v) for layer, v in zip(moe_layers, rate)}, grid, edges


def sampled_logits(trace: Trace, prompt_lens: list[int], response_lens: list[int]) -> list[torch.Tensor | None]:
    """Per sequence, the lm_head rows [R_i, V] that predicted its R_i response tokens
    (input positions P_i - 1 .. P_i + R_i - 2); None where the trace lacks them."""
    rows = trace.values.get((None, "lm_head"), {})
    out = []
    for s, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        want = torch.arange(p - 1, p - 1 + r)
        have = rows.get(s)
        out.append(None if have is None or r == 0 or not torch.isin(want, have[0]).all()
                   else have[1][torch.searchsorted(have[0], want)])
    return out


def vocab_divergence(rollout_logits: list, trainer_logits: list, temperature: float) -> dict[str, list[float]]:
    """KL(rollout ‖ trainer) and total variation of the whole next-token distribution
    (temperature-scaled, in fp64) at every sampled position, with its response position."""
    kl, tv, where = [], [], []
    for a, b in zip(rollout_logits, trainer_logits):
        if a is None or b is None:
            continue
        la = torch.log_softmax(a.double() / temperature, -1)
        lb = torch.log_softmax(b.double() / temperature, -1)
        kl += (la.exp() * (la - lb)).sum(-1).tolist()
        tv += (0.5 * (la.exp() - lb.exp()).abs().sum(-1)).tolist()
        where += list(range(a.shape[0]))
    return {"kl": kl, "tv": tv, "position": where}


def _intersect(pos_a: torch.Tensor, pos_b: torch.Tensor):
    common = pos_a[torch.isin(pos_a, pos_b)]
    ia = torch.searchsorted(pos_a, common)
    ib = torch.searchsorted(pos_b, common)
    return common, ia, ib
