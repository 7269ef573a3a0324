"""Ring-linear 2.0 inside vLLM, built from ring-rl's one model definition.

`RingLinearVllmForCausalLM` is `ring_rl.model.RingLinearModel` (same decoder layers, same
RMSNorm/MoE modules, same `ops` and hence the same `ring_rl.kernels`) with each layer's token
mixer swapped for a subclass that takes its cache from vLLM instead of `RingCache`:

- lightning layers are vLLM "mamba-like" state layers (`MambaBase`, LINEAR type): vLLM's
  hybrid cache manager gives every request one fp32 state slot [H, d, d] per layer and the
  LINEAR backend hands over the slots. Decodes (vLLM puts them first) run
  `lightning_attn_decode` on the slots; prefills (whole or chunked) run `lightning_attn` with
  `cu_seqlens` and the slots as initial states. Both through `LightningAttention.forward`
  itself, with a `SeqBatch` whose cache is vLLM's state tensor.
- softmax layers keep our projections, qk-norm and RoPE, and use vLLM's `Attention` (its
  paged KV cache and backend) for the attention itself.

The recurrent state is fp32 whatever the model dtype (vLLM's default would be the model
dtype), logits are fp32 (`ops.lm_logits`), and the decay schedule is `ops.log_decay` (the
HF form, not vLLM's). Parameter names are the checkpoint's, so `load_weights` reads real
Ring-linear checkpoints through `ring_rl.model.checkpoint`'s one name mapping.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateCopyFuncCalculator
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from ring_rl.model.attention import LightningAttention, SoftmaxAttention
from ring_rl.model.cache import SeqBatch
from ring_rl.model.checkpoint import (
    CheckpointError,
    _is_skipped,
    checkpoint_target,
    expert_slice,
)
from ring_rl.model.config import RingLinearConfig
from ring_rl.model.modeling import RingLinearModel
from ring_rl.model.ops import DEFAULT_OPS, ModelOps

STATE_DTYPE = torch.float32  # the trainer's recurrence runs in fp32; so must the slots


def ring_config(hf_config) -> RingLinearConfig:
    """vLLM's hf_config as a RingLinearConfig (it already is one once the plugin registered it)."""
    if isinstance(hf_config, RingLinearConfig):
        return hf_config
    fields = {k: v for k, v in hf_config.to_dict().items() if k not in ("model_type", "transformers_version")}
    return RingLinearConfig(**fields)


def _register_layer(vllm_config: VllmConfig, prefix: str, layer: nn.Module) -> None:
    """vLLM finds cache-holding layers (and binds their caches) by name in this dict."""
    static = vllm_config.compilation_config.static_forward_context
    if prefix in static:
        raise ValueError(f"duplicate vLLM layer name {prefix!r}")
    static[prefix] = layer


def _layer_metadata(prefix: str):
    meta = get_forward_context().attn_metadata
    return meta.get(prefix) if isinstance(meta, dict) else None


class _SlotStates:
    """The one thing `LightningAttention` reads from a cache: `state[layer]` [slots, H, d, d]."""

    def __init__(self, layer_idx: int, state: torch.Tensor):
        self.state = {layer_idx: state}


class VllmLightningAttention(LightningAttention, MambaBase):
    """LightningAttention whose recurrent state lives in vLLM's state slots."""

    def __init__(self, config: RingLinearConfig, layer_idx: int, ops: ModelOps,
                 vllm_config: VllmConfig, prefix: str):
        LightningAttention.__init__(self, config, layer_idx, ops)
        # The decay schedule is derived, never loaded: a plain attribute rather than a buffer,
        # so vLLM's in-place reload (which re-creates each layer's buffers and expects to load
        # them) leaves it alone. KeepFP32Buffers still keeps it fp32.
        decay = self.log_decay
        del self.log_decay
        self.log_decay = decay
        self.prefix = prefix
        _register_layer(vllm_config, prefix, self)

    # -- what vLLM's hybrid cache manager asks of a state layer ----------------------------
    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.LINEAR

    def get_state_shape(self) -> tuple[tuple[int, int, int]]:
        return ((self.num_heads, self.head_dim, self.head_dim),)

    def get_state_dtype(self) -> tuple[torch.dtype]:
        return (STATE_DTYPE,)

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, batch: SeqBatch) -> torch.Tensor:
        meta = _layer_metadata(self.prefix)
        if meta is None:  # vLLM's profile/dummy run: no slots, one sequence, no cache
            return LightningAttention.forward(self, x, batch)
        state = self.kv_cache[0]
        slots_cache = _SlotStates(self.layer_idx, state)
        nd, npre = meta.num_decodes, meta.num_prefills
        nd_tok, npre_tok = meta.num_decode_tokens, meta.num_prefill_tokens
        slots = meta.state_indices_tensor.long()
        out = x.new_zeros(x.shape[0], self.dense.out_features)  # rows past the real tokens: padding
        if nd:  # one token each, batched first by vLLM's LINEAR backend
            # A new one-token prompt counts as a decode too, and vLLM does not clear the
            # slot it hands over (it may hold a finished request's state).
            state[slots[:nd][meta.seq_lens[:nd].to(slots.device) == 1]] = 0
            dec = SeqBatch(meta.query_start_loc[: nd + 1], batch.positions[:nd_tok], 1, slots_cache, slots[:nd])
            out[:nd_tok] = LightningAttention.forward(self, x[:nd_tok], dec)
        if npre:
            qsl = meta.query_start_loc[nd: nd + npre + 1]
            cu = (qsl - qsl[0]).to(torch.int32)
            lens = torch.diff(cu).long()
            p_slots = slots[nd: nd + npre]
            fresh = (meta.seq_lens[nd: nd + npre].to(lens.device) - lens) == 0
            state[p_slots[fresh]] = 0  # a new request's slot may hold a finished one's state
            pre = SeqBatch(cu, batch.positions[nd_tok: nd_tok + npre_tok], int(lens.max()), slots_cache, p_slots)
            out[nd_tok: nd_tok + npre_tok] = LightningAttention.forward(self, x[nd_tok: nd_tok + npre_tok], pre)
        return out


class VllmSoftmaxAttention(SoftmaxAttention):
    """SoftmaxAttention's projections, qk-norm and RoPE; vLLM's paged attention."""

    def __init__(self, config: RingLinearConfig, layer_idx: int, ops: ModelOps,
                 vllm_config: VllmConfig, prefix: str):
        super().__init__(config, layer_idx, ops)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads,
                              cache_config=vllm_config.cache_config, prefix=f"{prefix}.attn")

    def forward(self, x: torch.Tensor, batch: SeqBatch) -> torch.Tensor:
        # The same steps as SoftmaxAttention.forward up to the attention call.
        n, d, dtype = x.shape[0], self.head_dim, x.dtype
        q, k, v = self.ops.linear(x, self.query_key_value.weight).split(
            [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        q, k = q.reshape(n, self.num_heads, d).float(), k.reshape(n, self.num_kv_heads, d).float()
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q = self.ops.rotary(q, batch.positions, self.rotary_dim, self.rope_theta).to(dtype)
        k = self.ops.rotary(k, batch.positions, self.rotary_dim, self.rope_theta).to(dtype)
        meta = _layer_metadata(self.attn.layer_name)
        if self.ops.paged_attention is not None and meta is not None:
            out = self._paged(q, k, v.reshape(n, self.num_kv_heads, d).contiguous(), batch.positions, meta)
        else:
            out = self.attn(q.reshape(n, -1), k.reshape(n, -1), v.contiguous())
        return self.ops.linear(out.reshape(n, self.num_heads * d), self.dense.weight)

    def _paged(self, q, k, v, positions, meta) -> torch.Tensor:
        """Exact mode: vLLM writes K/V into its paged cache as ever; the attention is
        `ops.paged_attention` over that cache, the trainer's kernel (batch invariant, so
        vLLM's batching and chunking do not change a token's bits). The cache is the
        FLASH_ATTN layout: logical [blocks, Hkv, block_size, 2d], K and V side by side."""
        cache, d = self.attn.kv_cache, self.head_dim
        if cache.dim() != 4 or cache.shape[1] != self.num_kv_heads or cache.shape[-1] != 2 * d:
            raise RuntimeError(f"exact mode: vLLM's KV cache for {self.attn.layer_name} has shape "
                               f"{tuple(cache.shape)}, not FLASH_ATTN's [blocks, {self.num_kv_heads}, "
                               f"block_size, {2 * d}]; run vLLM with attention_backend='FLASH_ATTN'")
        m = meta.num_actual_tokens
        self.attn.impl.do_kv_cache_update(self.attn, k[:m], v[:m], cache, meta.slot_mapping[:m])
        key_cache, value_cache = cache.transpose(1, 2).split(d, dim=-1)  # [blocks, block_size, Hkv, d]
        qsl = meta.query_start_loc
        seq = torch.searchsorted(qsl[1:], torch.arange(m, device=q.device, dtype=qsl.dtype), right=True)
        out = q.new_zeros(q.shape)
        out[:m] = self.ops.paged_attention(q[:m], key_cache, value_cache, meta.block_table, seq,
                                           positions[:m], self.head_dim ** -0.5)
        return out


def _expert_loader(param: torch.Tensor, loaded: torch.Tensor, expert: int | None = None,
                   part: str | None = None) -> None:
    """Fill one checkpoint expert tensor into its slice of the stacked [E, ...] parameter, or
    (expert None: the trainer's state_dict) the whole stacked tensor."""
    dest = param.data if expert is None else expert_slice(param.data, expert, part)
    if dest.shape != loaded.shape:
        raise CheckpointError(f"shape {tuple(loaded.shape)}, the model expects {tuple(dest.shape)}")
    dest.copy_(loaded)


def _plain_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise CheckpointError(f"shape {tuple(loaded.shape)}, the model expects {tuple(param.shape)}")
    param.data.copy_(loaded)


class RingLinearVllmForCausalLM(nn.Module, HasInnerState, IsHybrid):
    """vLLM's model interface around RingLinearModel (see the module docstring)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", ops: ModelOps = DEFAULT_OPS):
        super().__init__()
        config = ring_config(vllm_config.model_config.hf_config)
        self.config, self.ops = config, ops
        self.model = RingLinearModel(config, ops)
        base = f"{prefix}.model" if prefix else "model"
        for layer in self.model.layers:
            i, name = layer.layer_idx, f"{base}.layers.{layer.layer_idx}.attention"
            mixer = VllmSoftmaxAttention if layer.is_softmax else VllmLightningAttention
            layer.attention = mixer(config, i, ops, vllm_config, name)
            if layer.is_moe:
                # vLLM's routed-experts capture binds any module with these two attributes.
                layer.mlp.layer_id, layer.mlp.capture_fn = i, None
                layer.mlp.experts.gate_up_proj.weight_loader = _expert_loader
                layer.mlp.experts.down_proj.weight_loader = _expert_loader
        self._state_layer_names = [layer.attention.prefix for layer in self.model.layers if not layer.is_softmax]
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Sampling temperature folded into the logits (set by the engine per generate call):
        # vLLM then samples at T=1 and its raw logprobs are log_softmax(logits / T) before
        # top-k/top-p -- the trainer's definition (ring_rl.model.sampling).
        self.logits_temperature = 1.0
        # Set by the engine (extension.RouteRecorder) while it wants each token's experts, and
        # (trace.VllmRecorder) while align-check traces every op.
        self.route_recorder = None
        self.step_tracer = None

    # -- vLLM's model interface --------------------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.word_embeddings(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors=None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids is None:
            raise NotImplementedError("RingLinearVllmForCausalLM: prompt embeddings are not supported")
        n = input_ids.shape[0]
        meta = _layer_metadata(self._state_layer_names[0]) if self._state_layer_names else None
        if self.step_tracer is not None and meta is not None:  # a real step, not a dummy run
            self.step_tracer.set_step(positions, meta.query_start_loc)
        # Layers with vLLM metadata take their batch layout from it; this SeqBatch (one
        # sequence, no cache) is what they run on in vLLM's metadata-free dummy runs.
        batch = SeqBatch(torch.tensor([0, n], dtype=torch.int32, device=input_ids.device), positions, n)
        out = self.model.forward_flat(input_ids, batch)
        for layer in self.model.layers:
            capture = getattr(layer.mlp, "capture_fn", None)
            if capture is not None:
                capture(out.router_ids[layer.layer_idx])
        if self.route_recorder is not None and out.router_ids and meta is not None:
            self.route_recorder.record(positions, out.router_ids, meta.query_start_loc)
        return out.hidden

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.ops.lm_logits(hidden_states, self.lm_head.weight)  # fp32
        if self.logits_temperature != 1.0:
            logits = logits / self.logits_temperature
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint-named tensors → parameters/buffers (experts into their stacked slice).
        Each tensor goes through its parameter's `weight_loader` when vLLM set one (its
        layerwise reload wraps them). Returns the model names that were filled."""
        tensors = dict(self.named_parameters())
        tensors.update(self.named_buffers())
        loaded: set[str] = set()
        for name, tensor in weights:
            if _is_skipped(name, self.config):
                continue
            target, expert, part = checkpoint_target(name)
            dest = tensors.get(target)
            if dest is None:
                raise CheckpointError(f"unexpected tensor {name!r} (no such weight in {type(self).__name__})")
            try:
                loader = getattr(dest, "weight_loader", _plain_loader)
                if expert is None:
                    loader(dest, tensor.to(dest.dtype))
                else:
                    loader(dest, tensor.to(dest.dtype), expert, part)
            except CheckpointError as e:
                raise CheckpointError(f"tensor {name!r}: {e}") from None
            loaded.add(target)
        return loaded

    def weight_names(self) -> set[str]:
        """The trainer model's state_dict names (vLLM's own attention modules hold none)."""
        vllm_owned = tuple(f"{name}." for name, m in self.named_modules() if isinstance(m, Attention))
        return {name for name in self.state_dict() if not name.startswith(vllm_owned)}

    # -- vLLM's hybrid-model interface ---------------------------------------------------------
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, int, int]]:
        config = ring_config(vllm_config.model_config.hf_config)
        if vllm_config.parallel_config.tensor_parallel_size != 1:
            raise ValueError("RingLinearVllmForCausalLM: tensor parallelism is not supported")
        d = config.linear_head_dim
        return ((config.num_attention_heads, d, d),)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype]:
        return (STATE_DTYPE,)

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple:
        return MambaStateCopyFuncCalculator.linear_attention_state_copy_func()
