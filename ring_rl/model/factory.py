"""Building checkpoints the project makes itself (the real ones cannot be downloaded here)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ring_rl.model.checkpoint import save_checkpoint
from ring_rl.model.config import load_model_config
from ring_rl.model.modeling import RingLinearForCausalLM
from ring_rl.model.tokenizer import build_char_tokenizer


def build_random_checkpoint(preset: str, out: str | os.PathLike, seed: int = 0,
                            dtype: torch.dtype = torch.float32) -> Path:
    """A random-init checkpoint of `preset` with the character tokenizer beside it."""
    config = load_model_config(preset)
    tok = build_char_tokenizer()
    if len(tok) > config.vocab_size:
        raise ValueError(f"preset {preset!r}: vocab_size {config.vocab_size} < tokenizer size {len(tok)}")
    config.eos_token_id, config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    model = RingLinearForCausalLM(config).to(dtype)
    out = Path(out)
    save_checkpoint(model, out)
    tok.save_pretrained(out)
    return out
