"""Recording what each op of the model computes, token by token, in whichever engine runs it.

`tracing(model, recorder)` runs a model with
- its `ModelOps` replaced by wrappers that call the same functions and record their outputs
  (results are unchanged, bit for bit: a wrapper only reads), and
- forward hooks on the norms, token mixers, MLPs and decoder layers.
Both are undone on exit. Every recorded row is keyed by (sequence, input position), so the
rollout's prefill + one-token decode steps and the trainer's single packed forward line up
row by row however each engine batched them.

Op names, in the order a decoder layer runs them (OP_ORDER), then after the stack (HEAD_OPS):
  input_norm   input_layernorm output             qk_norm   q and k after their RMSNorm
  rotary       q and k after RoPE                 attn_core lightning attention's o (before its gate)
  out_gate     GroupRMSNorm(o) * sigmoid(g)       attention the mixer's output (after `dense`)
  post_norm    post_attention_layernorm output    router    MoE router logits
  mlp          MoE / dense MLP output             hidden    the residual stream after the layer
  final_norm   the final RMSNorm                  lm_head   logits (only rows that predict a response token)
Softmax layers have no attn_core / out_gate; dense layers no router.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from ring_rl.kernels.lightning_attn import chunk_lightning_attn_ref
from ring_rl.model.ops import ModelOps

OP_ORDER = ("input_norm", "qk_norm", "rotary", "attn_core", "out_gate", "attention",
            "post_norm", "router", "mlp", "hidden")
HEAD_OPS = ("final_norm", "lm_head")

Key = tuple  # (layer index or None after the stack, op name)


@dataclass
class Trace:
    """What one engine computed. `values[(layer, op)][seq]` = (positions [n] sorted,
    fp32 rows [n, F]); `states[layer][seq]` = the lightning layer's recurrent state
    [H, K, V] (fp32) at the end of sequence seq's prompt."""

    values: dict[Key, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    states: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)

    def keys_in_order(self) -> list[Key]:
        layers = sorted({layer for layer, _ in self.values if layer is not None})
        keys = [(layer, op) for layer in layers for op in OP_ORDER]
        keys += [(None, op) for op in HEAD_OPS]
        return [k for k in keys if k in self.values]


class Recorder:
    """Collects one engine's op outputs while `tracing` is active.

    prompt_lens[s]: prompt length of sequence s (a decode step at position prompt_lens[s]
    reads the state at the end of the prompt; lm_head rows before prompt_lens[s] - 1 are
    dropped: they predict prompt tokens). seq_ids: the sequence index of each packed
    sequence of a cache-less forward (the trainer's pack); with a cache the slot is the
    sequence index (the native engine gives prompt i slot i). lm_rows: the hidden rows the
    lm_head is applied to when it is not all of them (the trainer's `PackedBatch.rows`).
    state_from_inputs: rebuild each lightning layer's end-of-prompt state from the k, v it
    was given (the trainer keeps no state; its chunked form is the definition)."""

    def __init__(self, prompt_lens: list[int], seq_ids: list[int] | None = None,
                 lm_rows: torch.Tensor | None = None, state_from_inputs: bool = False):
        self.prompt_lens = torch.tensor(prompt_lens, dtype=torch.long)
        self.seq_ids = None if seq_ids is None else torch.tensor(seq_ids, dtype=torch.long)
        self.lm_rows = None if lm_rows is None else lm_rows.cpu()
        self.state_from_inputs = state_from_inputs
        self.layer: int | None = None
        self.batch = None
        self.coords: tuple[torch.Tensor, torch.Tensor] | None = None  # (seq [N], position [N])
        self.pending: dict[Key, list[torch.Tensor]] = defaultdict(list)
        self.chunks: dict[Key, list[tuple]] = defaultdict(list)
        self.states: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)
        self.state_inputs: dict[int, list[tuple]] = defaultdict(list)

    # -- where are we -------------------------------------------------------------------
    def enter_layer(self, layer: int | None, batch=None) -> None:
        self.layer = layer
        if batch is not None and batch is not self.batch:
            self.batch = batch
            local, _ = batch.token_coords()
            local = local.cpu()
            seq = batch.slots.cpu()[local] if batch.slots is not None else local
            if self.seq_ids is not None:
                seq = self.seq_ids[seq]
            self.coords = (seq.long(), batch.positions.cpu().long())

    # -- what was computed ----------------------------------------------------------------
    def record(self, op: str, value: torch.Tensor) -> None:
        n = self.coords[0].numel()
        self.pending[(self.layer, op)].append(value.detach().float().reshape(n, -1).cpu())

    def flush(self) -> None:
        """Close the current forward's rows: parts of one op (q and k) join along features."""
        for key, parts in self.pending.items():
            self.chunks[key].append((*self.coords, torch.cat(parts, dim=1)))
        self.pending.clear()

    def record_logits(self, logits: torch.Tensor) -> None:
        seq, pos = self.coords
        if self.lm_rows is not None and logits.shape[0] != seq.numel():
            seq, pos = seq[self.lm_rows], pos[self.lm_rows]
        keep = pos >= self.prompt_lens[seq] - 1  # rows that predict a response token
        rows = logits.detach().float().cpu()[keep]
        self.chunks[(None, "lm_head")].append((seq[keep], pos[keep], rows))

    def snapshot_states(self, state: torch.Tensor, slots: torch.Tensor | None) -> None:
        """Before a decode step: the slots about to consume their first response token hold
        the state at the end of their prompt (in the cache's own dtype)."""
        seq, pos = self.coords
        slots = torch.arange(seq.numel()) if slots is None else slots.cpu()
        for row in torch.nonzero(pos == self.prompt_lens[seq]).flatten().tolist():
            self.states[self.layer][int(seq[row])] = state[int(slots[row])].detach().float().cpu().clone()

    def keep_lightning_inputs(self, k, v, log_decay) -> None:
        if self.state_from_inputs:
            seq, pos = self.coords
            n = seq.numel()
            self.state_inputs[self.layer].append((seq, pos, k.detach().float().reshape(n, *k.shape[-2:]).cpu(),
                                                  v.detach().float().reshape(n, *v.shape[-2:]).cpu(),
                                                  log_decay.detach().float().cpu()))

    # -- the result -------------------------------------------------------------------------
    def finish(self) -> Trace:
        self.flush()
        values = {key: _by_sequence(chunks) for key, chunks in self.chunks.items()}
        states = {layer: dict(by_seq) for layer, by_seq in self.states.items()}
        for layer, parts in self.state_inputs.items():
            states[layer] = self._states_from_inputs(parts)
        return Trace(values, states)

    def _states_from_inputs(self, parts) -> dict[int, torch.Tensor]:
        seq = torch.cat([p[0] for p in parts])
        pos = torch.cat([p[1] for p in parts])
        k, v = torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts])
        decay = parts[0][4]
        out = {}
        for s in seq.unique().tolist():
            rows = torch.nonzero((seq == s) & (pos < self.prompt_lens[s])).flatten()
            rows = rows[pos[rows].argsort()]
            # The state depends on k, v and the decay only (q and the scale touch o, not S).
            _, final = chunk_lightning_attn_ref(k[rows][None], k[rows][None], v[rows][None], decay,
                                                output_final_state=True)
            out[s] = final[0]
        return out


def _by_sequence(chunks) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    seq = torch.cat([c[0] for c in chunks])
    pos = torch.cat([c[1] for c in chunks])
    vals = torch.cat([c[2] for c in chunks])
    out = {}
    for s in seq.unique().tolist():
        rows = torch.nonzero(seq == s).flatten()
        rows = rows[pos[rows].argsort()]
        out[s] = (pos[rows], vals[rows])
    return out


# ----------------------------------------------------------------------------- wiring

def recording_ops(base: ModelOps, rec: Recorder) -> ModelOps:
    """`base` with each op that engines must agree on wrapped to record its output."""

    def after(fn: Callable, on_output: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            on_output(out, *args)
            return out
        return wrapped

    def lightning(q, k, v, log_decay, *args, **kwargs):
        o, final = base.lightning_attn(q, k, v, log_decay, *args, **kwargs)
        rec.record("attn_core", o[0])
        rec.keep_lightning_inputs(k[0], v[0], log_decay)
        return o, final

    def decode(q, k, v, log_decay, state, state_indices=None, scale=None):
        rec.snapshot_states(state, state_indices)
        o = base.lightning_attn_decode(q, k, v, log_decay, state, state_indices=state_indices, scale=scale)
        rec.record("attn_core", o)
        return o

    return base.with_(
        rotary=after(base.rotary, lambda out, *a: rec.record("rotary", out)),
        lightning_attn=lightning,
        lightning_attn_decode=decode,
        group_norm_gate=after(base.group_norm_gate, lambda out, *a: rec.record("out_gate", out)),
        router_logits=after(base.router_logits, lambda out, *a: rec.record("router", out)),
        lm_logits=after(base.lm_logits, lambda out, *a: rec.record_logits(out)),
    )


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def tracing(model, rec: Recorder):
    """Record every op of `model` (a RingLinearForCausalLM) into `rec` while inside."""
    owners = [m for m in model.modules() if isinstance(getattr(m, "ops", None), ModelOps)]
    saved = [m.ops for m in owners]
    wrapped: dict[int, ModelOps] = {}
    for m in owners:
        m.ops = wrapped.setdefault(id(m.ops), recording_ops(m.ops, rec))
    handles = []

    # A forward hook that returns something replaces the module's output: these return None.
    def on(module, op):
        def hook(mod, args, out):
            rec.record(op, _first(out))
        handles.append(module.register_forward_hook(hook))

    def _layer_done(mod, args, out):  # out = (h, residual, ids); the stream is h + residual
        rec.record("hidden", out[0] + out[1])
        rec.flush()

    def _final_norm_done(mod, args, out):
        rec.record("final_norm", _first(out))
        rec.flush()

    for layer in model.model.layers:
        handles.append(layer.register_forward_pre_hook(
            lambda mod, args: rec.enter_layer(mod.layer_idx, args[2])))
        handles.append(layer.register_forward_hook(_layer_done))
        on(layer.input_layernorm, "input_norm")
        on(layer.post_attention_layernorm, "post_norm")
        on(layer.attention, "attention")
        on(layer.mlp, "mlp")
        if getattr(layer.attention, "use_qk_norm", False):
            on(layer.attention.query_layernorm, "qk_norm")
            on(layer.attention.key_layernorm, "qk_norm")
    norm = model.model.norm
    handles.append(norm.register_forward_pre_hook(lambda mod, args: rec.enter_layer(None)))
    handles.append(norm.register_forward_hook(_final_norm_done))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()
        for m, ops in zip(owners, saved):
            m.ops = ops
