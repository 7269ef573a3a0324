"""The data that crosses actors: a few explicit dataclasses with tensors inside.

Imported by the rollout engines, the trainer, the alignment checks and the driver; it
imports nothing of ring_rl, so it sits below all of them.

Lists of per-sequence tensors pickle as one flat buffer per dtype (`TensorList`): Ray pickles
every tensor through a torch.save of its own (~0.1-0.2 ms each, ~1 ms per MB), and a step's
batch holds hundreds of tiny ones. The buffers travel as NumPy byte arrays, which Ray writes
into its object store out of band (pickle protocol 5) instead of through torch.save."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


class TensorList(list):
    """A list of tensors (or None) that pickles as one flat buffer per dtype plus shapes, and
    unpickles as a plain list of views into those buffers, on the CPU. Behaves as a list
    otherwise."""

    def __reduce__(self):
        return _unflatten, _flatten(self)


class TensorDict(dict):
    """A name -> tensor dict (e.g. a state dict) pickled like `TensorList`."""

    _flat = None   # (buffers, layout) when built by `packed`

    @classmethod
    def packed(cls, items) -> TensorDict:
        """(name, tensor) pairs copied once into one CPU buffer per dtype; the dict holds views
        of it, and pickling sends the buffers as they are. The trainer's weights for the
        rollout: one copy on its critical path instead of a copy and then a concatenation."""
        names, tensors = zip(*items) if items else ((), ())
        buffers, layout = _flatten(list(tensors))
        out = cls(zip(names, _unflatten(buffers, layout)))
        out._flat = (buffers, layout)
        return out

    def __reduce__(self):
        if self._flat is not None:
            return _unflatten_dict, (list(self), *self._flat)
        return _unflatten_dict, (list(self), *_flatten(list(self.values())))


def _flatten(items: list) -> tuple[list[tuple[np.ndarray, torch.dtype]], list]:
    """(per dtype the bytes of all its tensors, back to back; per item (dtype index, shape) or None)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    layout = []
    for t in items:
        if t is None:
            layout.append(None)
            continue
        group = by_dtype.setdefault(t.dtype, [])
        group.append(t.detach().reshape(-1))
        layout.append((list(by_dtype).index(t.dtype), tuple(t.shape)))
    flats = [torch.cat(group).cpu() for group in by_dtype.values()]
    return [(f.view(torch.uint8).numpy(), f.dtype) for f in flats], layout


def _unflatten(buffers: list[tuple[np.ndarray, torch.dtype]], layout: list) -> list:
    # Ray hands out read-only views of its object store: those are copied (one memcpy).
    flats = [torch.from_numpy(b if b.flags.writeable else b.copy()).view(dtype) for b, dtype in buffers]
    sizes: list[list[int]] = [[] for _ in flats]
    for entry in layout:
        if entry is not None:
            sizes[entry[0]].append(math.prod(entry[1]))
    # One split per buffer makes all its views at once (a step's ~1000 slices one by one: 3-4 ms).
    pieces = [iter(f.split(s)) for f, s in zip(flats, sizes)]
    out = []
    for entry in layout:
        if entry is None:
            out.append(None)
            continue
        g, shape = entry
        piece = next(pieces[g])
        out.append(piece if len(shape) == 1 else piece.view(shape))
    return out


def _unflatten_dict(names: list[str], buffers: list, layout: list) -> dict:
    return dict(zip(names, _unflatten(buffers, layout)))


def _packed_state(obj, fields: tuple[str, ...]) -> dict:
    """obj's attributes with the listed tensor-list fields as TensorLists (see __getstate__)."""
    state = dict(obj.__dict__)
    for name in fields:
        if state.get(name) is not None:
            state[name] = TensorList(state[name])
    return state


class StaleWeightsError(RuntimeError):
    """A rollout was asked for, or trained on, with weights other than the allowed version(s)."""


def check_policy_lag(trainer_version: int, rollout_version: int, max_lag: int) -> int:
    """The trainer's weight version minus the one that sampled the rollout (0 on-policy);
    StaleWeightsError unless it lies in [0, max_lag] (`rollout.max_staleness`)."""
    lag = trainer_version - rollout_version
    if not 0 <= lag <= max_lag:
        raise StaleWeightsError(f"rollout sampled with weights v{rollout_version}, trainer holds v{trainer_version}: "
                                f"lag {lag}, allowed 0..{max_lag} (rollout.max_staleness)")
    return lag


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    seed: int = 0


@dataclass
class RolloutBatch:
    """What a rollout engine returns, one entry per sequence.

    logprobs[i][t] is the engine's fp32 logprob of response token t under the
    temperature-scaled distribution (see ring_rl.model.sampling). router_ids[i] holds the
    experts each MoE layer chose at every input position the engine ran
    ([num_moe_layers, P_i + R_i - 1, top_k]; the last sampled token is never fed back)."""

    prompt_ids: list[torch.Tensor]
    response_ids: list[torch.Tensor]
    logprobs: list[torch.Tensor]
    finish_reasons: list[str]
    weight_version: int
    sampling: SamplingParams
    group_ids: list[int] = field(default_factory=list)
    router_ids: list[torch.Tensor] | None = None
    # How the engine decomposed the work, for exact-mode replay: the sequence indices of
    # each engine call (one packed prefill + decode steps), and its prefill chunk (0 = whole).
    schedule: list[list[int]] | None = None
    prefill_chunk: int = 0

    def __len__(self) -> int:
        return len(self.response_ids)

    @classmethod
    def concat(cls, parts: list["RolloutBatch"]) -> "RolloutBatch":
        """Sequences of several engine calls, in order; each call stays one schedule entry."""
        if not parts:
            raise ValueError("RolloutBatch.concat: nothing to concatenate")
        schedule, offset = [], 0
        for p in parts:
            for call in p.schedule or [list(range(len(p)))]:
                schedule.append([offset + i for i in call])
            offset += len(p)
        first = parts[0]
        return cls(
            prompt_ids=[x for p in parts for x in p.prompt_ids],
            response_ids=[x for p in parts for x in p.response_ids],
            logprobs=[x for p in parts for x in p.logprobs],
            finish_reasons=[x for p in parts for x in p.finish_reasons],
            weight_version=first.weight_version,
            sampling=first.sampling,
            group_ids=[x for p in parts for x in p.group_ids],
            router_ids=[x for p in parts for x in p.router_ids] if first.router_ids is not None else None,
            schedule=schedule,
            prefill_chunk=first.prefill_chunk,
        )

    @property
    def num_response_tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)

    def __getstate__(self):
        return _packed_state(self, ("prompt_ids", "response_ids", "logprobs", "router_ids"))


@dataclass
class TrainBatch:
    """A rollout plus what the driver and alignment checks add before the update."""

    rollout: RolloutBatch
    rewards: torch.Tensor                            # [B]
    advantages: torch.Tensor                         # [B]
    old_logprobs: list[torch.Tensor] | None = None   # the trainer's, per response token
    token_weights: list[torch.Tensor] | None = None  # alignment policy weights/masks per token

    def __getstate__(self):
        return _packed_state(self, ("old_logprobs", "token_weights"))


@dataclass
class AlignmentReport:
    """The alignment checks' verdict on one step, taken before its update (see
    `ring_rl.alignment_checks.step.StepCheck`): what the update uses and what the driver logs."""

    metrics: dict[str, float | str]                  # align/*, router/*, policy/*, gate/* of the step
    trainer_logprobs: list[torch.Tensor]             # per sequence, the trainer's (for the token files)
    old_logprobs: list[torch.Tensor]                 # what the update's ratio is taken against
    token_weights: list[torch.Tensor] | None = None  # alignment policy weights/masks per token
    action: str = "none"                             # the gate's: none | warn | skip | abort
    exact_difference: str | None = None              # exact mode: where bitwise equality first broke

    @property
    def update(self) -> bool:
        """Whether the update may run (no skip/abort, exact mode's promise kept)."""
        return self.action not in ("skip", "abort") and self.exact_difference is None

    def __getstate__(self):
        return _packed_state(self, ("trainer_logprobs", "old_logprobs", "token_weights"))
