"""The maths of `linear`: x @ W.T with fp32 accumulation, rounded once to out_dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_ref(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    out_dtype = out_dtype or x.dtype
    if out_dtype == x.dtype:
        return F.linear(x, weight)
    return F.linear(x.float(), weight.float()).to(out_dtype)
