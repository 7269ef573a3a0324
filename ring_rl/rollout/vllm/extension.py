"""What the rollout engine asks of vLLM's workers, as a `worker_extension_cls`.

vLLM mixes this class into its worker class in every worker process; `LLM.collective_rpc`
calls its methods there (in single- and multi-process mode alike). Tensors cross as
safetensors bytes: vLLM's RPC serialises raw tensor arguments as lists in multi-process mode.

- `ring_load_weights` (bytes) / `ring_load_weights_tensors` (in-process): new weights in
  memory, through vLLM's in-place `reload_weights` (which calls our model's `load_weights`
  with the checkpoint names).
- `ring_set_ops`: the op set (exact mode: `BATCH_INVARIANT_OPS`).
- `ring_set_logits_temperature`: the sampling temperature folded into the logits (see
  `RingLinearVllmForCausalLM.logits_temperature`).
- `ring_routes_begin` / `ring_routes_take`: the experts each MoE layer chose for every token
  the model ran, per request. vLLM 0.32's own routed-experts capture needs Model Runner V2
  (Triton), which the CPU build lacks, so the model records them itself (`RouteRecorder`).
- `ring_trace_begin` / `ring_trace_take`: every op's output per request and position, for
  align-check (`trace.VllmRecorder`); returned as `torch.save` bytes.
"""
from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ring_rl.model.checkpoint import checkpoint_target


class RouteRecorder:
    """Per forward: which request owns which tokens (the runner's batch order, which is the
    token order), their positions, and the experts chosen for them."""

    def __init__(self, request_ids: Callable[[], Sequence[str]]):
        self.request_ids = request_ids
        self.pieces: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)

    def record(self, positions: torch.Tensor, router_ids: dict[int, torch.Tensor],
               query_start_loc: torch.Tensor) -> None:
        stacked = torch.stack([router_ids[k] for k in sorted(router_ids)]).to(torch.int16).cpu()  # [L, N, k]
        positions = positions.cpu()
        bounds = query_start_loc.tolist()
        for j, rid in enumerate(list(self.request_ids())[: len(bounds) - 1]):
            s, e = bounds[j], bounds[j + 1]
            if e > s:
                self.pieces[rid].append((positions[s:e].clone(), stacked[:, s:e].clone()))

    def take(self) -> dict[str, torch.Tensor]:
        """request id → [L, positions run, k]; a position run twice (preemption) keeps the last."""
        out = {}
        for rid, pieces in self.pieces.items():
            length = max(int(p.max()) for p, _ in pieces) + 1
            first = pieces[0][1]
            routes = torch.full((first.shape[0], length, first.shape[2]), -1, dtype=torch.int16)
            for pos, ids in pieces:
                routes[:, pos] = ids
            out[rid] = routes
        self.pieces.clear()
        return out


class RingWorkerExtension:
    """Methods vLLM adds to its worker (`self` is the worker: `self.model_runner`)."""

    def _ring_model(self):
        return self.model_runner.get_model()

    def ring_load_weights(self, blob: bytes) -> int:
        """safetensors bytes of checkpoint-named tensors → the model, in place."""
        return self.ring_load_weights_tensors(load_safetensors(blob))

    def ring_load_weights_tensors(self, tensors: dict[str, torch.Tensor]) -> int:
        """The same from tensors (any device): when the engine core runs in the caller's
        process, collective_rpc passes them by reference, with no serialisation."""
        missing = self._ring_model().weight_names() - {checkpoint_target(name)[0] for name in tensors}
        if missing:
            raise KeyError(f"weight update: missing {sorted(missing)[:3]} ({len(missing)} in all)")
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()))
        self._ring_apply_ops()  # in case the reload rebuilt modules with the default op set
        return len(tensors)

    def ring_set_ops(self, name: str) -> None:
        """"batch_invariant" (exact mode) or "default": the op set every layer runs."""
        self._ring_ops = name
        self._ring_apply_ops()

    def _ring_apply_ops(self) -> None:
        from ring_rl.model.ops import BATCH_INVARIANT_OPS, DEFAULT_OPS, set_ops

        name = getattr(self, "_ring_ops", "default")
        set_ops(self._ring_model(), {"batch_invariant": BATCH_INVARIANT_OPS, "default": DEFAULT_OPS}[name])

    def ring_set_logits_temperature(self, temperature: float) -> None:
        self._ring_model().logits_temperature = float(temperature)

    def ring_routes_begin(self) -> None:
        runner = self.model_runner
        self._ring_model().route_recorder = RouteRecorder(lambda: runner.input_batch.req_ids)

    def ring_routes_take(self) -> bytes:
        """safetensors bytes {request id: [moe layers, positions, top_k] int16}; stops recording."""
        model = self._ring_model()
        recorder, model.route_recorder = model.route_recorder, None
        routes = recorder.take() if recorder is not None else {}
        return save_safetensors({rid: t.contiguous() for rid, t in routes.items()})

    def ring_trace_begin(self) -> None:
        from ring_rl.alignment_checks.trace import tracing
        from ring_rl.rollout.vllm.trace import VllmRecorder

        model, runner = self._ring_model(), self.model_runner
        rec = VllmRecorder(lambda: runner.input_batch.req_ids)
        ctx = tracing(model, rec)
        ctx.__enter__()
        model.step_tracer = rec
        self._ring_trace = (ctx, rec)

    def ring_trace_take(self) -> bytes:
        """torch.save bytes {"values", "rid_index", "partial_ops"}; stops tracing."""
        ctx, rec = self._ring_trace
        self._ring_model().step_tracer = None
        ctx.__exit__(None, None, None)
        trace = rec.finish()
        buf = io.BytesIO()
        torch.save({"values": trace.values, "rid_index": rec.rid_index, "partial_ops": sorted(rec.partial_ops)}, buf)
        return buf.getvalue()
