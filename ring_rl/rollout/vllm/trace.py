"""Op traces from inside vLLM, for `ring-rl align-check --engine vllm`.

`alignment_checks.trace.tracing` records every op of a model keyed by (sequence, position).
Under vLLM a step's tokens belong to requests (vLLM's batch order), the layers get their
batch layout from vLLM's metadata, and the lm_head sees only each request's last row. So
the model tells `VllmRecorder` each step's layout (`set_step`), the recorder keys rows by
request (a running index; `remap` turns it into the caller's prompt index afterwards) and
keeps every lm_head row (the prompt-length filter is applied in `remap`).

Ops that a step runs on part of its rows (the lightning mixer's insides when decodes and
prefills share a step: vLLM runs the two groups separately) are not recorded for that step;
their name is kept in `partial_ops`. The recurrent state at the end of the prompt is not
traced (vLLM's slots are not sequences): align-check then reports no state row.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ring_rl.alignment_checks.trace import Recorder, Trace


class VllmRecorder(Recorder):
    def __init__(self, request_ids: Callable[[], Sequence[str]]):
        super().__init__(prompt_lens=[])
        self.request_ids = request_ids
        self.rid_index: dict[str, int] = {}
        self.partial_ops: set[str] = set()
        self.rows_in_step = 0

    def set_step(self, positions: torch.Tensor, query_start_loc: torch.Tensor) -> None:
        """Called by the model at the start of each real (not dummy) forward."""
        self.flush()
        bounds = query_start_loc.tolist()
        rids = list(self.request_ids())[: len(bounds) - 1]
        ids = torch.tensor([self.rid_index.setdefault(r, len(self.rid_index)) for r in rids], dtype=torch.long)
        lens = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])], dtype=torch.long)
        n = bounds[-1]
        self.coords = (torch.repeat_interleave(ids, lens), positions[:n].cpu().long().clone())  # vLLM reuses its buffer
        self.rows_in_step = positions.shape[0]  # may include padding rows past n
        self.lm_rows = torch.tensor(bounds[1:], dtype=torch.long) - 1  # vLLM's logits_indices

    def enter_layer(self, layer: int | None, batch=None) -> None:
        self.layer = layer  # the layout comes from set_step, not from the model's SeqBatch

    def record(self, op: str, value: torch.Tensor) -> None:
        if self.coords is None:
            return  # a forward before set_step (none is expected while tracing)
        n = self.coords[0].numel()
        if value.shape[0] == self.rows_in_step:
            value = value[:n]
        elif value.shape[0] != n:
            self.partial_ops.add(op)
            return
        super().record(op, value.detach().clone())  # vLLM may reuse or edit the tensor in place later

    def record_logits(self, logits: torch.Tensor) -> None:
        seq, pos = self.coords
        if logits.shape[0] != seq.numel():
            seq, pos = seq[self.lm_rows], pos[self.lm_rows]
        # A copy: vLLM's sampler edits the logits in place (penalties, top-k/top-p masks).
        self.chunks[(None, "lm_head")].append((seq, pos, logits.detach().float().cpu().clone()))

    def snapshot_states(self, state: torch.Tensor, slots: torch.Tensor | None) -> None:
        return

    def flush(self) -> None:
        if self.coords is not None:
            super().flush()
        self.pending.clear()


def remap(trace: Trace, rid_index: dict[str, int], prompt_index: dict[str, int],
          prompt_lens: list[int]) -> Trace:
    """Key a VllmRecorder trace by the caller's prompt index; keep only the lm_head rows
    that predict a response token (position ≥ prompt length − 1)."""
    to_prompt = {i: prompt_index[rid] for rid, i in rid_index.items() if rid in prompt_index}
    values = {}
    for key, by_seq in trace.values.items():
        out = {}
        for s, (pos, rows) in by_seq.items():
            if s not in to_prompt:
                continue
            p = to_prompt[s]
            if key == (None, "lm_head"):
                keep = pos >= prompt_lens[p] - 1
                pos, rows = pos[keep], rows[keep]
            out[p] = (pos, rows)
        values[key] = out
    return Trace(values, {})
