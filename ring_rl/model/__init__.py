"""The one Ring-linear 2.0 model definition, used by the trainer and every rollout engine."""
from transformers import AutoConfig, AutoModelForCausalLM

from ring_rl.model.cache import RingCache, SeqBatch
from ring_rl.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ring_rl.model.config import RingLinearConfig, load_model_config
from ring_rl.model.modeling import RingLinearForCausalLM
from ring_rl.model.ops import DEFAULT_OPS, ModelOps

# from_pretrained(dir) on a local checkpoint resolves to our classes, no trust_remote_code.
AutoConfig.register(RingLinearConfig.model_type, RingLinearConfig, exist_ok=True)
AutoModelForCausalLM.register(RingLinearConfig, RingLinearForCausalLM, exist_ok=True)

__all__ = [
    "RingLinearConfig", "RingLinearForCausalLM", "RingCache", "SeqBatch", "ModelOps", "DEFAULT_OPS",
    "load_model_config", "load_checkpoint", "save_checkpoint", "CheckpointError",
]
