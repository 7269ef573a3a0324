"""Weights for tests that must not pass by accident: norms off all-ones, expert bias off zero."""
from __future__ import annotations

import torch


def randomise(model):
    """Perturb every norm weight and every MoE expert bias (in place); returns `model`."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
        for layer in model.model.layers:
            if layer.is_moe:
                layer.mlp.gate.expert_bias.normal_(0, 0.05)
    return model
