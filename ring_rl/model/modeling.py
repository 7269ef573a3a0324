"""RingLinearForCausalLM: the one model definition every engine runs.

Internally every forward runs on flattened tokens [N, hidden] plus a `SeqBatch` (the
layout vLLM uses too); padded [B, T] inputs are unpadded on the way in and re-padded on
the way out, so padded, packed and one-by-one inputs run the same per-token maths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ring_rl.model.attention import LightningAttention, RMSNorm, SoftmaxAttention
from ring_rl.model.cache import RingCache, SeqBatch
from ring_rl.model.config import RingLinearConfig
from ring_rl.model.mlp import DenseMLP, MoE
from ring_rl.model.ops import DEFAULT_OPS, ModelOps


class DecoderLayer(nn.Module):
    """Pre-norm block with the residual add fused into the norms:
    h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, config: RingLinearConfig, layer_idx: int, ops: ModelOps):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_softmax = config.is_softmax_layer(layer_idx)
        attn_cls = SoftmaxAttention if self.is_softmax else LightningAttention
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.attention = attn_cls(config, layer_idx, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config, ops) if self.is_moe else DenseMLP(config.hidden_size, config.intermediate_size, ops)

    def forward(self, x, residual, batch: SeqBatch, replay_ids=None):
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.attention(h, batch)
        h, residual = self.post_attention_layernorm(h, residual)
        ids = None
        if self.is_moe:
            h, ids = self.mlp(h, replay_ids)
        else:
            h = self.mlp(h)
        return h, residual, ids


@dataclass
class FlatOutput:
    hidden: torch.Tensor                       # [N, hidden] after the final norm
    router_ids: dict[int, torch.Tensor]        # MoE layer -> chosen experts [N, top_k]
    layer_outputs: list[torch.Tensor] | None   # residual stream after each layer


class RingLinearPreTrainedModel(PreTrainedModel):
    config_class = RingLinearConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif type(module).__name__ == "MoEGate":
            nn.init.normal_(module.weight, std=std)
            module.expert_bias.zero_()
        elif type(module).__name__ == "StackedExperts":
            nn.init.normal_(module.gate_up_proj, std=std)
            nn.init.normal_(module.down_proj, std=std)


class RingLinearModel(RingLinearPreTrainedModel):
    def __init__(self, config: RingLinearConfig, ops: ModelOps = DEFAULT_OPS):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, ops) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.post_init()

    def forward_flat(self, input_ids: torch.Tensor, batch: SeqBatch, replay_ids=None,
                     output_layers: bool = False) -> FlatOutput:
        x, residual = self.word_embeddings(input_ids), None
        router_ids, layer_outputs = {}, [] if output_layers else None
        for layer in self.layers:
            replay = replay_ids.get(layer.layer_idx) if replay_ids else None
            x, residual, ids = layer(x, residual, batch, replay)
            if ids is not None:
                router_ids[layer.layer_idx] = ids
            if output_layers:
                layer_outputs.append(x + residual)
        hidden, _ = self.norm(x, residual)
        return FlatOutput(hidden, router_ids, layer_outputs)


    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        """Padded [B, T] → last_hidden_state [B, T, hidden] (zeros at padding), for callers
        that use the HF backbone directly (e.g. TRL's fused lm-head loss)."""
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        flat = self.forward_flat(input_ids[valid], SeqBatch.build(valid.sum(1))).hidden
        out = flat.new_zeros(*input_ids.shape, flat.shape[-1])
        out[valid] = flat
        return BaseModelOutputWithPast(last_hidden_state=out)


class RingLinearForCausalLM(RingLinearPreTrainedModel, GenerationMixin):
    def __init__(self, config: RingLinearConfig, ops: ModelOps = DEFAULT_OPS):
        super().__init__(config)
        self.ops = ops
        self.model = RingLinearModel(config, ops)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.word_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    # -- the engine-facing entry point ------------------------------------------------
    def forward_flat(self, input_ids: torch.Tensor, batch: SeqBatch, replay_ids=None,
                     output_layers: bool = False):
        """Flattened tokens [N] → (fp32 logits [N, vocab], FlatOutput). Advances the cache."""
        out = self.model.forward_flat(input_ids, batch, replay_ids, output_layers)
        logits = self.ops.lm_logits(out.hidden, self.lm_head.weight)
        if batch.cache is not None:
            batch.cache.lengths[batch.slots] += torch.diff(batch.cu_seqlens).long().to(batch.cache.lengths.device)
        return logits, out

    def new_cache(self, num_slots: int, capacity: int = 64) -> RingCache:
        return RingCache(self.config, num_slots, self.lm_head.weight.dtype, self.lm_head.weight.device,
                         capacity, state_dtype=self.ops.state_dtype)

    # -- the transformers-facing entry point ------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: RingCache | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        replay_ids: dict[int, torch.Tensor] | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Padded [B, T] input (any padding side; `attention_mask` marks real tokens, and with
        a cache covers past + new tokens), or packed [1, N] input with `cu_seqlens`.
        replay_ids: MoE layer -> experts [N_real, top_k] to force, real tokens row by row."""
        bsz, t = input_ids.shape
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache(bsz if cu_seqlens is None else cu_seqlens.numel() - 1)
        if cu_seqlens is not None:
            flat_ids, seqlens, valid = input_ids.reshape(-1), torch.diff(cu_seqlens).long(), None
        else:
            valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None \
                else attention_mask[:, -t:].bool()
            flat_ids, seqlens = input_ids[valid], valid.sum(1)
        batch = SeqBatch.build(seqlens, cache)
        flat_logits, _ = self.forward_flat(flat_ids, batch, replay_ids)
        if valid is None:
            logits = flat_logits.view(1, -1, flat_logits.shape[-1])
        else:
            logits = flat_logits.new_zeros(bsz, t, flat_logits.shape[-1])
            logits[valid] = flat_logits
        loss = None
        if labels is not None:
            shift = logits[:, :-1].reshape(-1, logits.shape[-1])
            loss = nn.functional.cross_entropy(shift, labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must hand us back our own RingCache

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      use_cache=True, **kwargs):
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values_length(past_key_values, attention_mask):]
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "past_key_values": past_key_values, "use_cache": use_cache}

    # -- checkpoints: exact HF names, strict loading (see checkpoint.py) ------------------
    def save_pretrained(self, save_directory, **kwargs):
        from ring_rl.model.checkpoint import save_checkpoint
        save_checkpoint(self, save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, dtype=None,
                        torch_dtype=None, ops: ModelOps = DEFAULT_OPS, **kwargs):
        from ring_rl.model.checkpoint import load_checkpoint
        return load_checkpoint(pretrained_model_name_or_path, config=config, dtype=dtype or torch_dtype, ops=ops)


def past_key_values_length(cache: RingCache, attention_mask: torch.Tensor | None) -> int:
    """Columns of a padded batch the cache has already consumed (generate() re-sends all)."""
    if attention_mask is None:
        return int(cache.lengths.max())
    # Every row's cached tokens are its real tokens so far; the padded width so far is
    # the mask width minus the new column(s). generate() adds one column per step.
    return attention_mask.shape[1] - 1 if int(cache.lengths.max()) > 0 else 0
