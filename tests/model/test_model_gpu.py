"""The model on the GPU runs the Triton kernels and agrees with the CPU reference path."""
from __future__ import annotations

import pytest
import torch

from ring_rl.model import RingLinearForCausalLM, SeqBatch, load_model_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cpu = RingLinearForCausalLM(load_model_config("tiny")).eval()
    with torch.no_grad():
        for layer in cpu.model.layers:
            if layer.is_moe:
                layer.mlp.gate.expert_bias.normal_(0, 0.05)
    gpu = RingLinearForCausalLM(load_model_config("tiny")).eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.cuda()


def test_gpu_logits_match_cpu_reference(models):
    """fp32 everywhere: Triton (ieee dots) vs the PyTorch reference within 1e-4 absolute."""
    cpu, gpu = models
    lens = torch.tensor([5, 64, 65, 130])
    ids = torch.randint(3, 128, (int(lens.sum()),))
    with torch.no_grad():
        ref, ref_out = cpu.forward_flat(ids, SeqBatch.build(lens))
        got, got_out = gpu.forward_flat(ids.cuda(), SeqBatch.build(lens.cuda()))
    torch.testing.assert_close(got.cpu(), ref, atol=1e-4, rtol=0)
    for layer, experts in ref_out.router_ids.items():  # same routing, position by position
        assert (got_out.router_ids[layer].cpu() == experts).float().mean() > 0.999


def test_gpu_incremental_decoding_matches_full_forward(models):
    _, gpu = models
    seqs = [torch.randint(3, 128, (n,), device="cuda") for n in (9, 40, 3)]
    with torch.no_grad():
        full = [gpu(s[None]).logits[0] for s in seqs]
        cache = gpu.new_cache(len(seqs))
        got = [[] for _ in seqs]
        logits, _ = gpu.forward_flat(torch.stack([s[0] for s in seqs]),
                                     SeqBatch.build(torch.ones(3, dtype=torch.long, device="cuda"), cache))
        for i in range(3):
            got[i].append(logits[i])
        for pos in range(1, 40):
            active = [i for i, s in enumerate(seqs) if pos < len(s)]
            slots = torch.tensor(active, device="cuda")
            logits, _ = gpu.forward_flat(torch.stack([seqs[i][pos] for i in active]),
                                         SeqBatch.build(torch.ones(len(active), dtype=torch.long, device="cuda"),
                                                        cache, slots))
            for j, i in enumerate(active):
                got[i].append(logits[j])
    for i in range(3):
        torch.testing.assert_close(torch.stack(got[i]), full[i], atol=1e-4, rtol=0)


def test_gpu_bf16_model_runs_triton_kernels_and_tracks_fp32(models, monkeypatch):
    """bf16 weights on the GPU: every kernel family is entered through its Triton path, the
    logprobs stay within bf16 noise of the fp32 reference, and a training backward works."""
    import importlib
    la_pkg, moe_pkg, rn_pkg = (importlib.import_module(f"ring_rl.kernels.{n}") for n in ("lightning_attn", "moe", "rms_norm"))
    cpu, _ = models
    bf16 = RingLinearForCausalLM(load_model_config("tiny")).eval()
    bf16.load_state_dict(cpu.state_dict())
    bf16 = bf16.to(device="cuda", dtype=torch.bfloat16)
    calls = []
    import ring_rl.kernels.dispatch as dispatch
    real = dispatch.use_triton

    def spy(*tensors):
        out = real(*tensors)
        calls.append(out)
        return out

    for pkg in (la_pkg, moe_pkg, rn_pkg):  # each package decides Triton vs reference here
        monkeypatch.setattr(pkg, "use_triton", spy)
    lens = torch.tensor([7, 70, 33])
    ids = torch.randint(3, 128, (int(lens.sum()),))
    with torch.no_grad():
        ref, _ = cpu.forward_flat(ids, SeqBatch.build(lens))
        calls.clear()  # the CPU reference above rightly took the reference path
        got, _ = bf16.forward_flat(ids.cuda(), SeqBatch.build(lens.cuda()))
    assert calls and all(calls), "a kernel took the reference path on CUDA tensors"
    lp_ref, lp_got = ref.log_softmax(-1), got.float().cpu().log_softmax(-1)
    assert (lp_got - lp_ref).abs().mean() < 2e-2   # bf16 weights/activations: ~3 significant digits
    bf16.train()
    logits, _ = bf16.forward_flat(ids.cuda(), SeqBatch.build(lens.cuda()))
    logits.float().log_softmax(-1)[:, 5].sum().backward()
    grads = [p.grad for p in bf16.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g.float()).all() for g in grads)
