"""Parameter counts and layout of a config, computed on the meta device (no memory used)."""
from __future__ import annotations

import torch

from ring_rl.model.config import RingLinearConfig


def model_info(config: RingLinearConfig) -> dict:
    from ring_rl.model.modeling import RingLinearForCausalLM

    with torch.device("meta"):
        model = RingLinearForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    embed = model.model.word_embeddings.weight.numel()
    head = model.lm_head.weight.numel()
    routed = sum(layer.mlp.experts.gate_up_proj.numel() + layer.mlp.experts.down_proj.numel()
                 for layer in model.model.layers if layer.is_moe)
    # Activated = what one token touches, without embedding and lm_head (the published rule).
    active_routed = routed * config.num_experts_per_tok / max(config.num_experts, 1)
    activated = total - embed - head - routed + active_routed
    return {
        "total_params": total,
        "activated_params": int(activated),
        "embedding_params": embed,
        "lm_head_params": head,
        "routed_expert_params": routed,
        "layers": config.num_hidden_layers,
        "layer_types": config.layer_types,
        "softmax_layers": [i for i, t in enumerate(config.layer_types) if t == "full_attention"],
        "moe_layers": [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)],
        "memory_bf16_gib": total * 2 / 2**30,
        "recurrent_state_bytes_per_seq": 4 * config.linear_head_dim ** 2 * config.num_attention_heads
        * config.layer_types.count("linear_attention"),
        "kv_bytes_per_token_bf16": 2 * 2 * config.num_key_value_heads * config.head_dim
        * config.layer_types.count("full_attention"),
    }


def format_info(info: dict) -> str:
    def billions(n: float) -> str:
        return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"

    schedule = "".join("S" if t == "full_attention" else "L" for t in info["layer_types"])
    return "\n".join([
        f"total parameters      {billions(info['total_params'])}",
        f"activated parameters  {billions(info['activated_params'])} (without embedding and lm_head)",
        f"embedding / lm_head   {billions(info['embedding_params'])} / {billions(info['lm_head_params'])}",
        f"layers                {info['layers']}: {schedule} (L lightning, S softmax {info['softmax_layers']})",
        f"MoE layers            {len(info['moe_layers'])} (first {info['moe_layers'][:1]})",
        f"weights at bf16       {info['memory_bf16_gib']:.2f} GiB",
        f"state per sequence    {info['recurrent_state_bytes_per_seq'] / 2**20:.2f} MiB fp32 (lightning layers)",
        f"KV per token (bf16)   {info['kv_bytes_per_token_bf16'] / 2**10:.1f} KiB (softmax layers)",
    ])
