"""vLLM's `vllm.general_plugins` entry point: make vLLM run Ring-linear 2.0 with ring-rl's model.

vLLM calls `register()` in every process it starts (engine core, workers) before it reads a
model config, so registering here works in single- and multi-process mode. Nothing in vLLM
is patched: the architecture name maps to our class through vLLM's own registry, and the
`bailing_moe_linear` config type maps to `RingLinearConfig` through transformers' registry
(vLLM has no config class of that name, and trust_remote_code is not needed).
"""
from __future__ import annotations

ARCHITECTURE = "BailingMoeLinearV2ForCausalLM"
MODEL_CLASS = "ring_rl.rollout.vllm.model:RingLinearVllmForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    import ring_rl.model  # noqa: F401  (registers RingLinearConfig with AutoConfig)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # A "module:Class" string: vLLM imports the model lazily, in the process that builds it.
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
