"""The rotary op: its hand-written backward and the per-positions memo of its angles."""
import torch

from ring_rl.model import ops
from tests.kernels.checks import assert_close


def _plain(x, positions, rotary_dim, theta):
    """The rotation with autograd recording every op (no Function, no memo)."""
    half = rotary_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, dtype=torch.float32) * 2.0 / rotary_dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return ops._rotate(x.float(), angles.cos()[:, None, :], angles.sin()[:, None, :], rotary_dim)


def test_rotary_forward_and_backward_match_autograd_of_the_plain_rotation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 40, generator=gen, requires_grad=True)  # 24 rotated features, 16 passed through
    positions = torch.randint(0, 3000, (50,), generator=gen)
    dy = torch.randn(50, 3, 40, generator=gen)
    got = ops.rotary(x, positions, 24, 1e4)
    want = _plain(x, positions, 24, 1e4)
    assert torch.equal(got, want)
    assert_close(torch.autograd.grad(got, x, dy)[0], torch.autograd.grad(want, x, dy)[0], 1e-6, "dx")


def test_remembered_angles_follow_the_positions_tensor():
    x = torch.randn(6, 2, 16)
    positions = torch.arange(6)
    first = ops.rotary(x, positions, 16, 1e4)
    positions += 5  # in place: a new version of the same tensor
    assert torch.equal(ops.rotary(x, positions, 16, 1e4), _plain(x, positions, 16, 1e4))
    assert not torch.equal(first, ops.rotary(x, positions, 16, 1e4))
    other = torch.arange(6) * 2  # another tensor, and another rotary width at the same positions
    assert torch.equal(ops.rotary(x, other, 16, 1e4), _plain(x, other, 16, 1e4))
    assert torch.equal(ops.rotary(x, other, 8, 1e4), _plain(x, other, 8, 1e4))
