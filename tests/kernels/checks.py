"""What the kernel tests share: the relative max-error check and the GPU skip mark."""
from __future__ import annotations

import pytest
import torch

FP32_TOL = 1e-5
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def assert_close(out, ref, tol=FP32_TOL, name=""):
    """Same shape and dtype, finite, and max |out - ref| <= tol * max |ref|."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, name
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:g} * {scale:.3g}"
