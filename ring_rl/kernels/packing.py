"""Packed (varlen) batches: sequences laid back to back, delimited by `cu_seqlens` offsets
([B+1], int). The reference paths pad them to [B, T_max] where an op needs a rectangle."""
from __future__ import annotations

import torch


def token_coords(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index, index within its sequence) of every token packed by cu_seqlens."""
    lens = torch.diff(cu_seqlens).long()
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
    return seq, torch.arange(seq.numel(), device=lens.device) - cu_seqlens[:-1].long()[seq]


def pad_packed(x: torch.Tensor, coords: tuple[torch.Tensor, torch.Tensor], nseq: int, tmax: int) -> torch.Tensor:
    """Packed [N, ...] → [nseq, tmax, ...] (coords: `token_coords`), zeros past each end."""
    out = x.new_zeros(nseq, tmax, *x.shape[1:])
    out[coords] = x
    return out
