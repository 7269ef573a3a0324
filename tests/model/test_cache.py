"""The slot cache's fan-out (a GRPO batch's prompt state to its group's other slots)."""
import torch

from ring_rl.model import load_model_config
from ring_rl.model.cache import RingCache


def _filled_cache(seed: int) -> RingCache:
    cfg = load_model_config("tiny")
    cache = RingCache(cfg, num_slots=14, dtype=torch.float32, capacity=8)
    gen = torch.Generator().manual_seed(seed)
    for s in cache.state.values():
        s.copy_(torch.randn(s.shape, generator=gen))
    for k, v in cache.kv.values():
        k.copy_(torch.randn(k.shape, generator=gen))
        v.copy_(torch.randn(v.shape, generator=gen))
    cache.lengths.copy_(torch.randint(1, 6, (14,), generator=gen))
    return cache


def test_fan_out_equals_copy_slots_and_leaves_the_other_slots():
    a, b = _filled_cache(0), _filled_cache(0)
    a.fan_out(3, 12)  # four groups of three in slots 0..11; slots 12, 13 untouched
    b.copy_slots(torch.tensor([0, 0, 3, 3, 6, 6, 9, 9]), torch.tensor([1, 2, 4, 5, 7, 8, 10, 11]))
    assert torch.equal(a.lengths, b.lengths)
    used = int(a.lengths[:12].max())
    for layer in a.state:
        assert torch.equal(a.state[layer], b.state[layer])
    fresh = _filled_cache(0)
    for layer in a.kv:
        for x, y, before in zip(a.kv[layer], b.kv[layer], fresh.kv[layer]):
            assert torch.equal(x[:, :, :used], y[:, :, :used])  # past `used` neither copies
            assert torch.equal(x[12:], before[12:])
    for layer in a.state:
        assert torch.equal(a.state[layer][12:], fresh.state[layer][12:])
