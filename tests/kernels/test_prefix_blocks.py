"""The one-block-per-prompt layout of shared-prompt batches (`ring_rl.kernels.prefix_blocks`):
its index maps and mask on a hand-made batch, and softmax attention over it against each
sequence whole (fp64 truth; lightning attention over it is tested in test_lightning_attn.py).
Tolerance fp32: 1e-5 relative, the same sums in another order."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ring_rl.kernels.prefix_blocks import prefix_blocks, softmax_blocks


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def test_layout_of_a_small_batch():
    """Prompts of 2 and 1 tokens (rows 0-1, 2); continuations of 2, 1, 1 tokens (rows 3-4, 5,
    6) after prompts 1, 0, 1. Block 0: rows 0, 1, 5 and a padding position; block 1: rows 2,
    3, 4, 6."""
    b = prefix_blocks(_cu([2, 1]), _cu([2, 1, 1]), torch.tensor([1, 0, 1]))
    assert (b.num_blocks, b.size) == (2, 4)
    assert b.gather.tolist() == [0, 1, 5, 0, 2, 3, 4, 6]  # padding reads row 0
    assert b.rows.tolist() == [0, 1, 4, 5, 6, 2, 7]
    t, f = True, False
    assert b.visible[1].tolist() == [[t, f, f, f],   # the prompt token
                                     [t, t, f, f],   # continuation 0, its two tokens
                                     [t, t, t, f],
                                     [t, f, f, t]]   # continuation 2: not its sibling's tokens
    assert b.dist[1].tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [2, 1, 0, 0], [1, 0, 0, 0]]
    assert b.visible[0, :3, 3].tolist() == [f, f, f]  # no real row sees the padding
    assert b.visible[0, 3].tolist() == [t, f, f, t]   # the padding: the first prompt token and itself
    assert prefix_blocks(_cu([2, 1]), _cu([2, 1, 1]), torch.tensor([1, 0, 1]), max_size=3) is None


def test_softmax_over_blocks_matches_whole_sequences():
    """GQA (4 query heads, 2 KV heads) over 3 prompts and 7 continuations in shuffled order,
    one continuation per prompt with a single token: outputs and q/k/v gradients (a prompt's
    summed over its continuations) against causal attention over each sequence whole."""
    gen = torch.Generator().manual_seed(3)
    plens, slens, parent = [5, 1, 3], [2, 1, 4, 1, 3, 2, 1], torch.tensor([2, 0, 0, 1, 2, 0, 1])
    n, total = sum(plens), sum(plens) + sum(slens)
    q, do = torch.randn(total, 4, 16, generator=gen), torch.randn(total, 4, 16, generator=gen)
    k, v = torch.randn(total, 2, 16, generator=gen), torch.randn(total, 2, 16, generator=gen)
    blocks = prefix_blocks(_cu(plens), _cu(slens), parent)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = softmax_blocks(*leaves, blocks)
    (out * do).sum().backward()
    got = [out.detach()] + [x.grad for x in leaves]

    ref = [x.double().requires_grad_() for x in (q, k, v)]
    pstart, sstart = _cu(plens).tolist(), _cu(slens).tolist()
    prompt_rows = [list(range(pstart[u], pstart[u + 1])) for u in range(len(plens))]
    seqs = prompt_rows + [prompt_rows[int(p)] + list(range(n + sstart[j], n + sstart[j + 1]))
                          for j, p in enumerate(parent)]
    want_out = torch.zeros(total, 4, 16, dtype=torch.float64)
    for i, rows in enumerate(seqs):
        idx = torch.tensor(rows)
        o = F.scaled_dot_product_attention(*(x[idx].transpose(0, 1) for x in ref), is_causal=True,
                                           enable_gqa=True).transpose(0, 1)
        own = idx if i < len(plens) else idx[len(prompt_rows[int(parent[i - len(plens)])]):]
        want_out = want_out.index_put((own,), o[len(idx) - len(own):])
    (want_out * do.double()).sum().backward()
    want = [want_out.detach()] + [x.grad for x in ref]
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < 1e-5, f"{name}: relative error {err:.2e}"
