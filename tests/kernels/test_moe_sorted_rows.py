"""The MoE experts on rows in expert order: x's rows copied in the forward and kept
(`triton_experts.FWD_ROWS`), the TMA row GEMMs (`TMA_GEMMS`, triton_tma.py) and the
grouped_mm forward (`FWD_GEMMS`), against the reference. CPU: Triton under the interpreter,
fp32, small shapes; GPU: Ring-mini shapes, bf16."""
from __future__ import annotations

import pytest
import torch

from ring_rl.kernels.moe import moe_experts, triton_experts, triton_tma
from tests.kernels.moe_cases import (
    BF16_TOL,
    MINI,
    check_reruns_and_idle,
    expert_inputs,
    gpu,
    ids_avoiding,
    mini_inputs,
)

SMALL_TMA = (16, 16, 16, 4, 1)
ALL_TMA = ("gate_up", "down", "dx", "down_bwd")


def set_paths(monkeypatch, row_gemm, **settings):
    """row_gemm: "tma" (every row GEMM that can) or "pointer" (none); then module constants."""
    monkeypatch.setattr(triton_experts, "TMA_GEMMS", ALL_TMA if row_gemm == "tma" else ())
    for name, value in settings.items():
        monkeypatch.setattr(triton_experts, name, value)


@pytest.mark.parametrize("fwd_rows,row_gemm,bwd,fwd_gemms,persistent", [
    ("sorted", "tma", "gmm_dw", "triton", False), ("sorted", "tma", "triton", "triton", False),
    ("gather", "tma", "gmm_dw", "triton", False), ("sorted", "pointer", "gmm_dw", "triton", False),
    ("sorted", "pointer", "gmm_dw", "gmm", False), ("gather", "tma", "gmm_dw", "triton", True),
    ("sorted", "tma", "triton", "triton", True)])
@pytest.mark.parametrize("t,h,inter,e,k", [(37, 48, 32, 8, 3), (21, 40, 24, 6, 2)])
def test_experts_sorted_rows_and_tma(triton_mode, monkeypatch, fwd_rows, row_gemm, bwd,
                                     fwd_gemms, persistent, t, h, inter, e, k):
    """x rows copied in the forward and kept (FWD_ROWS), the TMA row GEMMs (TMA_GEMMS, also
    as persistent kernels: PERSISTENT_GEMMS) and the grouped_mm forward (FWD_GEMMS),
    against the reference; experts 0 and e-1 idle; bitwise reruns; forward batch invariance
    (of the Triton GEMMs: grouped_mm's on the GPU). 16-row tiles cross expert boundaries;
    h=40 is no multiple of BLOCK_K 16 (the K-major TMA boxes zero-fill past K; the G GEMM,
    whose weight boxes would run into the next expert, falls back to the pointer kernel)."""
    set_paths(monkeypatch, row_gemm, FWD_ROWS=fwd_rows, BWD_GEMMS=bwd, FWD_GEMMS=fwd_gemms,
              PLAN="triton")
    monkeypatch.setattr(triton_experts, "PERSISTENT_GEMMS", ALL_TMA if persistent else ())
    for name in ("gate_up_tma", "down_tma", "down_bwd_tma", "dx_tma"):
        monkeypatch.setitem(triton_experts.CONFIGS, name, SMALL_TMA)
    monkeypatch.setattr(triton_experts, "LAUNCHED", {})
    monkeypatch.setattr(triton_tma, "LAUNCHED", triton_experts.LAUNCHED)
    inputs = expert_inputs(t, h, inter, e, k, seed=t, ids=ids_avoiding(t, e, k, (0, e - 1), t))
    got = check_reruns_and_idle(inputs, [0, e - 1])
    x, ids, w, wgu, wd, _ = inputs
    if fwd_gemms == "triton":     # torch's CPU loop for grouped_mm: BLAS, size-dependent
        assert torch.equal(moe_experts(x[:1], ids[:1], w[:1], wgu, wd), got[0][:1])
    launched = set(triton_experts.LAUNCHED)
    if row_gemm == "tma" and fwd_gemms == "triton":
        assert ("row_gemm_tma_persistent" if persistent else "row_gemm_tma") in launched
        assert ("row_gemm_tma" in launched) != persistent
        assert ("gate_up_tma" in launched) == (fwd_rows == "sorted")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fwd_rows,row_gemm,fwd_gemms,bwd", [
    ("sorted", "tma", "triton", "gmm_dw"), ("gather", "tma", "triton", "gmm_dw"),
    ("sorted", "tma", "triton", "triton"), ("sorted", "pointer", "gmm", "gmm_dw"),
    ("sorted", "tma", "gmm", "gmm_dw")])
def test_gpu_experts_sorted_rows_bf16(monkeypatch, fwd_rows, row_gemm, fwd_gemms, bwd):
    """The forward's sorted x rows (FWD_ROWS), the TMA row GEMMs (TMA_GEMMS) and the
    grouped_mm forward (FWD_GEMMS) at Ring-mini shapes in bf16, against the reference;
    bitwise reruns; exact zero weight gradients for idle experts."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("TMA and the grouped_mm paths are checked on sm90")
    set_paths(monkeypatch, row_gemm, FWD_ROWS=fwd_rows, FWD_GEMMS=fwd_gemms,
              BWD_GEMMS=bwd, PLAN="triton", DOWN_BWD_FUSED=False)
    inputs = mini_inputs(2048, seed=13)
    idle = torch.bincount(inputs[1].reshape(-1), minlength=MINI["e"]) == 0
    assert idle.any()
    check_reruns_and_idle(inputs, idle, BF16_TOL)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fwd_rows,row_gemm,fwd_gemms", [
    ("gather", "pointer", "triton"), ("sorted", "tma", "triton"), ("sorted", "pointer", "gmm")])
def test_gpu_experts_forward_batch_invariant(monkeypatch, fwd_rows, row_gemm, fwd_gemms):
    """A token's output is bitwise the same in batches of 1 to 8192 tokens. 8192 tokens
    (512 rows per expert on average) make CUTLASS's grouped GEMM take its 128x256 tile,
    4096 and fewer its 64x128 one: the grouped_mm forward is only batch invariant if
    those agree bit for bit."""
    if fwd_gemms == "gmm" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the grouped_mm forward runs on sm90 only")
    set_paths(monkeypatch, row_gemm, FWD_ROWS=fwd_rows, FWD_GEMMS=fwd_gemms,
              PLAN="triton")
    x, ids, w, wgu, wd, _ = mini_inputs(8192, seed=14, bias_scale=0.04)
    with torch.no_grad():
        full = moe_experts(x, ids, w, wgu, wd)
        for lo, hi in [(0, 1), (5, 300), (4096, 8192)]:
            part = moe_experts(x[lo:hi], ids[lo:hi], w[lo:hi], wgu, wd)
            assert torch.equal(part, full[lo:hi]), (lo, hi)


@gpu
@pytest.mark.gpu
def test_gpu_persistent_row_gemms_same_bits(monkeypatch):
    """The TMA row GEMMs as persistent kernels (PERSISTENT_GEMMS) give the bits of the
    one-program-per-tile kernels, forward and gradients, at Ring-mini shapes in bf16."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm90 or later")
    set_paths(monkeypatch, "tma", PLAN="triton")
    x, ids, w, wgu, wd, dy = mini_inputs(4096, seed=15)
    runs = []
    for persistent in (False, True):
        monkeypatch.setattr(triton_experts, "PERSISTENT_GEMMS", ALL_TMA if persistent else ())
        y = moe_experts(x, ids, w, wgu, wd)
        runs.append((y, *torch.autograd.grad(y, (x, w, wgu, wd), dy)))
    for name, a, b in zip(("y", "dx", "dw", "dwgu", "dwd"), *runs):
        assert torch.equal(a, b), name
