"""The prefill-then-decode schedule, shared by the rollout engine and exact-mode scoring.

`run_schedule` prefills every prompt (packed, optionally in chunks) and then decodes one
token per unfinished sequence per step, with the model's slot cache. What happens at each
step is a `Chooser`'s business: the native engine samples the next token (`SampleChooser`),
the trainer's exact mode feeds back the tokens a rollout already chose (`ReplayChooser`).
Because both run this one function, the trainer's exact-mode logprobs go through the same
packing, the same batch of rows at every step and the same ops in the same order as the
rollout's: on the same weights, dtype and thread count they are bitwise equal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ring_rl.model.cache import RingCache, SeqBatch
from ring_rl.model.modeling import RingLinearForCausalLM
from ring_rl.model.sampling import entropy_from_logits, sample, token_logprobs


class Chooser(Protocol):
    def __call__(self, step: int, rows: list[int], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (tokens [len(rows)], done [len(rows)] bool) for the active `rows` at `step`."""


@dataclass
class ScheduleResult:
    tokens: list[list[int]]                        # chosen tokens per sequence
    logprobs: list[torch.Tensor]                   # fp32 [len(tokens[i])] per sequence
    entropies: list[torch.Tensor] | None           # the same shapes (when asked for)
    finished_by_choice: list[bool]                 # the chooser said done (EOS) before the cap
    routes: list[list[torch.Tensor]] = field(default_factory=list)  # router id pieces [L, n, k]


@torch.no_grad()
def run_schedule(model: RingLinearForCausalLM, prompts: list[list[int]], max_new_tokens: int,
                 choose: Chooser, temperature: float, prefill_chunk: int = 0,
                 with_entropy: bool = False, cache: RingCache | None = None) -> ScheduleResult:
    """cache: `reusable_cache`'s result, the slot cache of an earlier call taken over without
    zeroing its buffers again (default: a new one)."""
    n, dev = len(prompts), model.lm_head.weight.device
    reused = cache is not None
    if not reused:
        cache = model.new_cache(n, capacity=max(len(p) for p in prompts) + max_new_tokens)
    res = ScheduleResult([[] for _ in range(n)], [], None, [False] * n, [[] for _ in range(n)])
    logits = _prefill(model, prompts, cache, res.routes, prefill_chunk, reused)
    active = torch.arange(n, device=dev)  # the rows still going; row active[j] lives in cache slot j
    steps = []  # (active, logprobs, entropies) of each step: per-sequence tensors are cut at the end
    for step in range(max_new_tokens):
        rows = active.tolist()
        tokens, done = choose(step, rows, logits)
        lp = token_logprobs(logits, tokens, temperature)
        steps.append((active, lp, entropy_from_logits(logits, temperature) if with_entropy else None))
        for i, token, finished in zip(rows, tokens.tolist(), done.tolist()):  # plain ints: no op per row
            res.tokens[i].append(token)
            if finished:
                res.finished_by_choice[i] = True
        keep = ~done
        if step == max_new_tokens - 1 or not bool(keep.any()):
            break
        if not bool(keep.all()):  # the m rows left take slots 0..m-1: only rows above m move
            m = int(keep.sum())
            holes = (~keep[:m]).nonzero().squeeze(-1)      # slots below m whose rows are done
            movers = keep[m:].nonzero().squeeze(-1) + m    # rows going on in slots m and up
            cache.copy_slots(movers, holes)
            order = torch.arange(m, device=dev)
            order[holes] = movers
            active, tokens = active[order], tokens[order]
        slots = torch.arange(active.numel(), device=dev)
        batch = SeqBatch.build(torch.ones(active.numel(), dtype=torch.long, device=dev), cache, slots)
        logits, out = model.forward_flat(tokens, batch)
        _record(res.routes, active.tolist(), out.router_ids, [1] * active.numel())
    lengths = [len(t) for t in res.tokens]
    res.logprobs = _per_sequence([(a, lp) for a, lp, _ in steps], n, lengths)
    if with_entropy:
        res.entropies = _per_sequence([(a, e) for a, _, e in steps], n, lengths)
    return res


def reusable_cache(cache: RingCache | None, model: RingLinearForCausalLM, num_slots: int) -> RingCache | None:
    """`cache` if `run_schedule` may take it over for `num_slots` sequences on this model
    (same slot count, dtypes and device; KV capacity grows by itself), else None."""
    if cache is None or cache.num_slots != num_slots:
        return None
    weight = model.lm_head.weight
    states = list(cache.state.values())
    if (cache.dtype, cache.device) != (weight.dtype, weight.device) or (
            states and states[0].dtype != model.ops.state_dtype):
        return None
    return cache


def _per_sequence(steps: list[tuple[torch.Tensor, torch.Tensor]], n: int, lengths: list[int]) -> list[torch.Tensor]:
    """Step s's values for its rows `active` → one tensor per sequence (a sequence is active
    at steps 0..len-1, so its values are the first `len` of its row in the [n, steps] table)."""
    if not steps:
        return [torch.zeros(0) for _ in range(n)]
    table = steps[0][1].new_zeros(n, len(steps))
    for s, (active, values) in enumerate(steps):
        table[active, s] = values
    keep = torch.arange(len(steps), device=table.device)[None, :] < torch.tensor(lengths, device=table.device)[:, None]
    return list(torch.split(table[keep], lengths))


def _prefill(model, prompts, cache, routes, chunk, reused: bool = False) -> torch.Tensor:
    """Run the prompts (in chunks of `chunk` tokens if > 0); return each one's last logits.

    A prompt that occurs several times (GRPO samples a group of responses per prompt) is run
    once, at its first row; the others copy that row's cache slot, logits and experts."""
    dev, n = model.lm_head.weight.device, len(prompts)
    lens = [len(p) for p in prompts]
    if min(lens) < 1:
        raise ValueError("every prompt needs at least one token")
    first: dict[tuple, int] = {}
    source = [first.setdefault(tuple(p), i) for i, p in enumerate(prompts)]
    if reused:
        # What the first prefill reads of the cache: the lengths and lightning states of the
        # slots it runs. The other slots are written (copied) before they are read, and KV
        # positions past a slot's length are masked out, so a used cache needs no more.
        cache.reset(torch.tensor(list(first.values()), dtype=torch.long, device=dev))
    chunk = chunk or max(lens)
    last = [None] * n
    for start in range(0, max(lens), chunk):
        rows = [i for i in range(n) if lens[i] > start and source[i] == i]
        pieces = [prompts[i][start:start + chunk] for i in rows]
        ids = torch.tensor([t for p in pieces for t in p], dtype=torch.long, device=dev)
        seqlens = [len(p) for p in pieces]
        slots = torch.tensor(rows, dtype=torch.long, device=dev)
        logits, out = model.forward_flat(ids, SeqBatch.build(torch.tensor(seqlens, device=dev), cache, slots))
        _record(routes, rows, out.router_ids, seqlens)
        end = 0
        for j, i in enumerate(rows):
            end += seqlens[j]
            if start + chunk >= lens[i]:
                last[i] = logits[end - 1]
    copies = [i for i in range(n) if source[i] != i]
    group = n // len(first)
    if copies and n % group == 0 and source == [i - i % group for i in range(n)]:
        cache.fan_out(group, n)  # the driver's layout: each group's rows together, its prompt first
    elif copies:
        cache.copy_slots(torch.tensor([source[i] for i in copies], device=dev), torch.tensor(copies, device=dev))
    for i in copies:
        last[i], routes[i] = last[source[i]], list(routes[source[i]])
    return torch.stack(last)


def _record(routes, rows, router_ids: dict[int, torch.Tensor], seqlens: list[int]) -> None:
    if not router_ids:
        return
    stacked = torch.stack([router_ids[layer] for layer in sorted(router_ids)]).to(torch.int16).cpu()  # [L, N, k]
    for j, piece in enumerate(torch.split(stacked, seqlens, dim=1)):
        routes[rows[j]].append(piece)


def stack_routes(pieces: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.cat(pieces, dim=1) if pieces else None


class SampleChooser:
    """Draw the next token per row from its own generator; EOS ends a sequence.

    A row's uniforms for up to `max_steps` steps are drawn in one call: `rand(b, V)` gives the
    numbers of b successive `rand(V)` calls, so the tokens are the same as drawing step by
    step, without a call per row per step (256 rows x 4 steps were 1,000 calls a batch). The
    buffer stays under NOISE_BYTES (a large vocabulary draws step by step)."""

    NOISE_BYTES = 16 << 20

    def __init__(self, temperature: float, top_p: float, top_k: int, generators: list[torch.Generator],
                 eos_ids: torch.Tensor, max_steps: int = 1):
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.generators, self.eos, self.max_steps = generators, eos_ids, max_steps
        self._noise, self._first = None, 0  # uniforms [rows, b, V] of steps first .. first + b - 1

    def __call__(self, step, rows, logits):
        uniform = self._uniform(step, rows, logits.shape[-1]) if self.temperature > 0 else None
        tokens = sample(logits, self.temperature, self.top_p, self.top_k, uniform=uniform)
        return tokens, torch.isin(tokens, self.eos.to(tokens.device))

    def _uniform(self, step: int, rows: list[int], vocab: int) -> torch.Tensor:
        if self._noise is None or step >= self._first + self._noise.shape[1]:
            b = max(1, min(self.max_steps - step, self.NOISE_BYTES // (4 * vocab * len(self.generators))))
            drawn = torch.stack([torch.rand(b, vocab, generator=self.generators[i], device=self.generators[i].device)
                                 for i in rows])
            self._noise = drawn.new_empty(len(self.generators), b, vocab)  # rows done by now: never read
            self._noise[torch.tensor(rows, device=drawn.device)] = drawn
            self._first = step
        index = torch.tensor(rows, device=self._noise.device)
        return self._noise[index, step - self._first]


class ReplayChooser:
    """Feed back recorded responses: sequence i is done after its last recorded token."""

    def __init__(self, responses: list[torch.Tensor]):
        self.responses = [r.long() for r in responses]

    def __call__(self, step, rows, logits):
        tokens = torch.stack([self.responses[i][step] for i in rows]).to(logits.device)
        done = torch.tensor([step == self.responses[i].numel() - 1 for i in rows], device=logits.device)
        return tokens, done
