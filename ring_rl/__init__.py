"""ring-rl: RL post-training for hybrid linear-attention MoE models with aligned engines."""
__version__ = "0.1.0"
