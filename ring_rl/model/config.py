"""RingLinearConfig: the Ring-linear 2.0 (`bailing_moe_linear`) config, field for field.

It parses the published Ring-mini-linear-2.0 `config.json` unchanged; presets live in
`configs/model/*.json`. Invalid values are refused at construction, naming the field.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import PretrainedConfig

# Fields some Bailing checkpoints carry that the model accepts and ignores (or refuses
# below when set to a value it does not implement).
_PASSTHROUGH_DEFAULTS = {
    "attention_dropout": 0.0,
    "embedding_dropout": 0.0,
    "output_dropout": 0.0,
    "use_rmsnorm": True,
    "moe_router_enable_shared_expert": True,
}


class RingLinearConfig(PretrainedConfig):
    model_type = "bailing_moe_linear"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 157184,
        hidden_size: int = 2048,
        intermediate_size: int = 5120,
        num_hidden_layers: int = 20,
        layer_group_size: int = 5,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 4,
        head_dim: int | None = 128,
        hidden_act: str = "silu",
        first_k_dense_replace: int = 1,
        num_experts: int = 256,
        num_experts_per_tok: int = 8,
        num_shared_experts: int = 1,
        moe_intermediate_size: int = 512,
        moe_shared_expert_intermediate_size: int | None = None,
        n_group: int = 8,
        topk_group: int = 4,
        score_function: str = "sigmoid",
        moe_router_enable_expert_bias: bool = True,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 2.5,
        router_dtype: str = "fp32",
        group_norm_size: int = 4,
        linear_silu: bool = False,
        use_qk_norm: bool = True,
        partial_rotary_factor: float = 0.5,
        rope_theta: float = 1e6,
        rope_scaling: dict | None = None,
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 131072,
        use_bias: bool = False,
        use_qkv_bias: bool = False,
        norm_head: bool = False,
        num_nextn_predict_layers: int = 0,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        eos_token_id: int | list[int] | None = 156892,
        pad_token_id: int | None = 156892,
        bos_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.layer_group_size = layer_group_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // max(num_attention_heads, 1)
        self.hidden_act = hidden_act
        self.first_k_dense_replace = first_k_dense_replace
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.num_shared_experts = num_shared_experts
        self.moe_intermediate_size = moe_intermediate_size
        self.moe_shared_expert_intermediate_size = (
            moe_shared_expert_intermediate_size
            if moe_shared_expert_intermediate_size is not None
            else moe_intermediate_size
        )
        self.n_group = n_group
        self.topk_group = topk_group
        self.score_function = score_function
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.router_dtype = router_dtype
        self.group_norm_size = group_norm_size
        self.linear_silu = linear_silu
        self.use_qk_norm = use_qk_norm
        self.partial_rotary_factor = partial_rotary_factor
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.use_bias = use_bias
        self.use_qkv_bias = use_qkv_bias
        self.norm_head = norm_head
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.initializer_range = initializer_range
        for key, default in _PASSTHROUGH_DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, default))
        self.validate_fields()  # before transformers' own checks, which read layer_types
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            **kwargs,
        )

    # -- derived layout -------------------------------------------------------------
    @property
    def linear_head_dim(self) -> int:
        """Lightning layers are MHA with head dim hidden/heads (they ignore `head_dim`)."""
        return self.hidden_size // self.num_attention_heads

    def is_softmax_layer(self, layer_idx: int) -> bool:
        g, n = self.layer_group_size, self.num_hidden_layers
        return (layer_idx + 1) % g == 0 or layer_idx >= (n // g) * g

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    @property
    def layer_types(self) -> list[str]:
        # transformers validates these names: full_attention = GQA softmax, linear_attention = lightning.
        return ["full_attention" if self.is_softmax_layer(i) else "linear_attention"
                for i in range(self.num_hidden_layers)]

    # -- validation -------------------------------------------------------------------
    def validate_fields(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"RingLinearConfig.{field} = {getattr(self, field)!r}: {why}")

        for field in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "layer_group_size",
            "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts_per_tok",
            "moe_intermediate_size", "n_group", "topk_group", "group_norm_size",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(field, "must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            bad("num_attention_heads", f"must divide hidden_size ({self.hidden_size})")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"must divide num_attention_heads ({self.num_attention_heads})")
        if self.num_experts < 0 or (self.num_experts and self.num_experts % self.n_group):
            bad("num_experts", f"must be a multiple of n_group ({self.n_group})")
        if self.num_experts and self.num_experts_per_tok > self.num_experts:
            bad("num_experts_per_tok", f"must be <= num_experts ({self.num_experts})")
        if self.topk_group > self.n_group:
            bad("topk_group", f"must be <= n_group ({self.n_group})")
        if self.num_experts and self.num_experts_per_tok > self.topk_group * (self.num_experts // self.n_group):
            bad("num_experts_per_tok", "exceeds the experts in the kept groups (topk_group * experts per group)")
        if (self.num_attention_heads * self.linear_head_dim) % self.group_norm_size:
            bad("group_norm_size", "must divide the lightning output width (heads * head dim)")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            bad("partial_rotary_factor", "must be in (0, 1]")
        rot = int(self.head_dim * self.partial_rotary_factor)
        if rot % 2 or int(self.linear_head_dim * self.partial_rotary_factor) % 2:
            bad("partial_rotary_factor", "must give an even rotary dimension")
        if self.score_function != "sigmoid":
            bad("score_function", "only 'sigmoid' is implemented")
        if self.router_dtype not in ("fp32", "float32"):
            bad("router_dtype", "only 'fp32' is implemented (the router must run in fp32)")
        if self.hidden_act != "silu":
            bad("hidden_act", "only 'silu' is implemented")
        # transformers folds rope_theta into a `rope_scaling`/`rope_parameters` dict of type "default".
        scaling = getattr(self, "rope_scaling", None) or {}
        scaling = scaling if isinstance(scaling, dict) else {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            bad("rope_scaling", "RoPE scaling is not implemented")
        if self.use_bias or self.use_qkv_bias:
            bad("use_bias" if self.use_bias else "use_qkv_bias", "biases are not implemented")
        if self.norm_head:
            bad("norm_head", "normalised lm_head is not implemented")
        if self.first_k_dense_replace < 0:
            bad("first_k_dense_replace", "must be >= 0")
        if not self.rms_norm_eps > 0:
            bad("rms_norm_eps", "must be > 0")


PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"


def load_model_config(name_or_path: str | os.PathLike) -> RingLinearConfig:
    """A preset name (`tiny`, `ring-mini-linear-2.0`), a config.json, or a checkpoint dir."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    elif not path.exists() and (PRESET_DIR / f"{name_or_path}.json").exists():
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.exists():
        presets = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
        raise FileNotFoundError(f"model config {str(name_or_path)!r}: no such file, directory or preset ({presets})")
    with open(path) as f:
        try:
            fields = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    model_type = fields.pop("model_type", RingLinearConfig.model_type)
    if model_type != RingLinearConfig.model_type:
        raise ValueError(f"{path}: model_type {model_type!r}, expected {RingLinearConfig.model_type!r}")
    return RingLinearConfig(**fields)
